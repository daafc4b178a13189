"""The GPT-2 model: sizes, Hugging Face parity both ways, padded vocab, generation."""

from __future__ import annotations

import pytest
import torch

from gpt2.config import PRESETS, ModelConfig
from gpt2.errors import ModelError
from gpt2.model import GPT, export_hf, generate

transformers = pytest.importorskip("transformers")

EXPECTED_PARAMS = {
    "gpt2": 124_439_808,
    "gpt2-medium": 354_823_168,
    "gpt2-large": 774_030_080,
    "gpt2-xl": 1_557_611_200,
}


@pytest.mark.parametrize("name", list(PRESETS))
def test_parameter_count_of_each_openai_size(name):
    with torch.device("meta"):
        model = GPT(ModelConfig(**PRESETS[name]))
    assert model.num_params() == EXPECTED_PARAMS[name]


def test_init_follows_gpt2():
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=8, n_head=4, n_embd=256, block_size=64, vocab_size=1000))
    assert model.transformer.wte.weight is model.lm_head.weight
    assert abs(model.transformer.h[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002
    assert abs(model.transformer.h[0].attn.c_proj.weight.std().item() - 0.02 / 4) < 0.0005  # 1/sqrt(2*8)
    assert torch.all(model.transformer.h[0].attn.c_attn.bias == 0)


def _hf_model(n_layer, n_head, n_embd, n_positions=1024, vocab_size=50257):
    torch.manual_seed(1)
    config = transformers.GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                                     vocab_size=vocab_size)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # random biases and LayerNorm gains too, so a missed copy shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "ln" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


SIZES = {"small": dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=1000),
         "124M": dict(n_layer=12, n_head=12, n_embd=768)}


@pytest.mark.parametrize("size,safe", [("small", True), ("small", False), ("124M", True)],
                         ids=["small-safetensors", "small-pytorch_model.bin", "124M-safetensors"])
def test_from_pretrained_matches_transformers(tmp_path, size, safe):
    hf = _hf_model(**SIZES[size])
    hf.save_pretrained(tmp_path, safe_serialization=safe)
    ours = GPT.from_pretrained(str(tmp_path)).eval()
    tokens = torch.randint(0, hf.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
        logits, _ = ours(tokens)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("size", list(SIZES))
def test_export_loads_in_transformers_with_same_logits(tmp_path, size):
    s = SIZES[size]
    torch.manual_seed(2)
    ours = GPT(ModelConfig(block_size=s.get("n_positions", 1024), vocab_size=s.get("vocab_size", 50257),
                         n_layer=s["n_layer"], n_head=s["n_head"], n_embd=s["n_embd"], pad_vocab_to=128)).eval()
    export_hf(ours, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, ours.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits, _ = ours(tokens)
        expected = hf(tokens).logits
    assert (logits - expected).abs().max().item() <= 1e-5


def test_padded_vocab_is_never_scored(tmp_path):
    hf = _hf_model(**SIZES["small"])
    hf.save_pretrained(tmp_path)
    plain = GPT.from_pretrained(str(tmp_path)).eval()
    padded = GPT.from_pretrained(str(tmp_path), pad_vocab_to=128).eval()
    assert padded.transformer.wte.weight.shape[0] == 1024 and padded.config.vocab_size == 1000
    x = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        a, la = plain(x, x)
        b, lb = padded(x, x)
    assert b.shape[-1] == 1000
    assert torch.equal(a, b) and torch.equal(la, lb)


def test_hub_name_without_network_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="could not download 'gpt2'.*local directory"):
        GPT.from_pretrained("gpt2")
    with pytest.raises(ValueError, match="neither a local directory nor a GPT-2 hub name"):
        GPT.from_pretrained("no-such-model-dir")


def _tiny(pad_to=1):
    torch.manual_seed(3)
    return GPT(ModelConfig(block_size=24, vocab_size=50, n_layer=1, n_head=2, n_embd=16, pad_vocab_to=pad_to))


def test_generation_is_deterministic_for_a_seed():
    model = _tiny()
    idx = torch.zeros((4, 3), dtype=torch.long)
    tokens: list[int] = []  # progress for the watchdog: once per new token
    runs = [generate(model, idx, 10, top_k=5, generator=torch.Generator().manual_seed(s),
                     on_token=lambda: tokens.append(1)) for s in (7, 7, 8)]
    assert runs[0].shape == (4, 13) and len(tokens) == 30
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_generation_never_emits_padded_ids_and_stops_at_context_length():
    model = _tiny(pad_to=64)  # 50 real ids, 64 rows
    with torch.no_grad():  # make the padded rows irresistible if they were ever considered
        model.lm_head.weight[50:] = 100.0
    out = generate(model, torch.zeros((8, 2), dtype=torch.long), 100, top_k=64,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape == (8, 24)  # block_size: no sliding past the context
    assert int(out.max()) < 50


def test_sample_command_on_a_hugging_face_directory(tmp_path, bpe_dir):
    from conftest import run_cli

    torch.manual_seed(0)
    export_hf(GPT(ModelConfig(block_size=64, n_layer=1, n_head=2, n_embd=16)), tmp_path, tokenizer_dir=str(bpe_dir))
    assert (tmp_path / "vocab.json").exists() and (tmp_path / "merges.txt").exists()
    r = run_cli(["-m", "gpt2.sample", str(tmp_path), "--tokenizer-dir", str(bpe_dir), "--num-samples", "2",
                 "--tokens", "6", "--prompt", "Hello world"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("sample 0: Hello world") and "sample 1: Hello world" in r.stdout
