"""GPT-2, exactly as OpenAI's: pre-LayerNorm blocks, tanh GELU, learned positions, tied embeddings.

Also: loading Hugging Face GPT-2 checkpoints (`GPT.from_pretrained`), exporting to the Hugging Face
layout (`export_hf`) and top-k sampling (`generate`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from torch.nn import functional as F

from gpt2.config import PRESETS, ModelConfig
from gpt2.errors import ModelError

# Hugging Face Conv1D stores weights as (in, out); our nn.Linear wants (out, in).
_CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention where available
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE", False):
                std *= (2 * self.config.n_layer) ** -0.5  # residual projections, GPT-2 paper
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters counted once (the tied embedding once), position embeddings included."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits over the real vocabulary (padded columns dropped), and the mean loss if targets."""
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block_size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = self.lm_head(x)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., : self.config.vocab_size]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    # ---- Hugging Face interchange -------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, pad_vocab_to: int = 1) -> GPT:
        """Load a Hugging Face GPT-2: a hub name (needs network) or a local directory.

        The directory holds `config.json` and `model.safetensors` or `pytorch_model.bin`, as
        `transformers.GPT2LMHeadModel.save_pretrained` writes them.
        """
        path = Path(name_or_path)
        if not (path / "config.json").is_file():
            if path.is_dir() and name_or_path not in PRESETS:
                raise ModelError(f"{path} has no config.json: not a Hugging Face model directory")
            path = _download_from_hub(name_or_path)
        hf = json.loads((path / "config.json").read_text())
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ModelError(f"{path}: activation_function '{act}' is not GPT-2's tanh GELU")
        config = ModelConfig(
            block_size=hf["n_positions"],
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            pad_vocab_to=pad_vocab_to,
        )
        model = cls(config)
        model.load_hf_state_dict(_read_hf_weights(path))
        return model

    def load_hf_state_dict(self, hf_sd: dict[str, torch.Tensor]) -> None:
        """Copy a Hugging Face GPT2LMHeadModel state dict into this model (Conv1D transposed)."""
        sd = self.state_dict()
        wanted = [k for k in sd if k != "lm_head.weight"]  # tied to wte
        hf_sd = {k.removeprefix("module."): v for k, v in hf_sd.items()}
        hf_sd = {k if k.startswith("transformer.") or k == "lm_head.weight" else "transformer." + k: v
                 for k, v in hf_sd.items()}
        missing = [k for k in wanted if k not in hf_sd]
        if missing:
            raise ModelError(f"checkpoint lacks {len(missing)} GPT-2 weights, e.g. {missing[:3]}")
        with torch.no_grad():
            for k in wanted:
                src = hf_sd[k]
                if k.endswith(_CONV1D_SUFFIXES):
                    src = src.t()
                dst = sd[k]
                if k == "transformer.wte.weight" and dst.shape[0] != src.shape[0]:
                    dst[src.shape[0]:].zero_()  # padded rows: never used, zero for clarity
                    dst = dst[: src.shape[0]]
                if src.shape != dst.shape:
                    raise ModelError(f"shape mismatch for {k}: checkpoint {tuple(src.shape)}, model {tuple(dst.shape)}")
                dst.copy_(src)

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """This model's weights in Hugging Face GPT2LMHeadModel layout (no lm_head: it is tied)."""
        out = {}
        for k, v in self.state_dict().items():
            if k == "lm_head.weight":
                continue
            if k == "transformer.wte.weight":
                v = v[: self.config.vocab_size]
            if k.endswith(_CONV1D_SUFFIXES):
                v = v.t()
            out[k] = v.detach().to("cpu", torch.float32).contiguous()
        return out


def build_model(cfg: ModelConfig) -> GPT:
    """A fresh GPT of the configured shape, or pretrained weights when `init_from` is set."""
    if cfg.init_from:
        return GPT.from_pretrained(cfg.init_from, pad_vocab_to=cfg.pad_vocab_to)
    return GPT(cfg)


def _download_from_hub(name: str) -> Path:
    if name not in PRESETS:
        raise ModelError(
            f"'{name}' is neither a local directory nor a GPT-2 hub name ({', '.join(PRESETS)})"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ModelError("loading from the hub needs huggingface_hub: pip install 'gpt2[hub]'") from None
    try:
        return Path(snapshot_download(name, allow_patterns=["config.json", "model.safetensors"]))
    except Exception as err:
        raise ModelError(
            f"could not download '{name}' from the Hugging Face hub ({type(err).__name__}: {err}). "
            "Without network, download it elsewhere (e.g. `huggingface-cli download gpt2`) and pass the "
            "local directory instead."
        ) from None


def _read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / "model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(str(path / "model.safetensors"))
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ModelError(f"{path} has neither model.safetensors nor pytorch_model.bin")


def export_hf(model: GPT, out_dir: str | os.PathLike, tokenizer_dir: str | None = None) -> Path:
    """Write `model` as a Hugging Face GPT-2 directory that `transformers` loads.

    If `tokenizer_dir` holds the GPT-2 BPE files, they are copied as vocab.json/merges.txt.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    c = model.config
    hf_config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": c.vocab_size,
        "n_positions": c.block_size,
        "n_ctx": c.block_size,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
        "tie_word_embeddings": True,
        "scale_attn_weights": True,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_dir:
        import shutil

        from gpt2.tokenizer import find_bpe_file

        if find_bpe_file(tokenizer_dir, "encoder.json").is_file():
            shutil.copyfile(find_bpe_file(tokenizer_dir, "encoder.json"), out / "vocab.json")
            shutil.copyfile(find_bpe_file(tokenizer_dir, "vocab.bpe"), out / "merges.txt")
    return out


# ---- generation ---------------------------------------------------------------------------------


@torch.no_grad()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    top_k: int = 50,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    on_token: Callable[[], None] | None = None,
) -> torch.Tensor:
    """Extend each row of `idx` (B, T) by top-k sampling; stops at the model's context length.

    Sampling draws from `generator` (seed it for reproducible samples) and only ever from the
    real vocabulary, never a padded id. `on_token()` after each new token (progress).
    """
    was_training = model.training
    model.eval()
    steps = min(max_new_tokens, model.config.block_size - idx.size(1))
    for _ in range(max(steps, 0)):
        logits, _ = model(idx)  # forward() already drops padded columns
        logits = logits[:, -1, :].float() / temperature
        k = min(top_k, logits.size(-1))
        top_logits, top_ids = torch.topk(logits, k, dim=-1)
        probs = F.softmax(top_logits, dim=-1)
        choice = torch.multinomial(probs, 1, generator=generator)
        idx = torch.cat((idx, torch.gather(top_ids, -1, choice)), dim=1)
        if on_token is not None:
            on_token()
    model.train(was_training)
    return idx


def flops_per_token(num_params: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Training FLOPs per token: 6N for the weights plus 6*L*C*T for attention (PaLM appendix B).

    C*T counts the attention scores and their product with the values, forward (x2) and
    backward (x4). For GPT-2 124M at T=1024 that is 6*124,439,808 + 6*12*768*1024 = 803.2 MFLOP.
    """
    return 6 * num_params + 6 * n_layer * n_embd * seq_len

