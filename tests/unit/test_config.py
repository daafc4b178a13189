"""Configs: the shipped YAML files, overrides, and clear errors before any work starts."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

from gpt2.config import ConfigError, exact_micro_batches, grad_accum_steps, load_config, to_dict, to_yaml


def test_124m_config_holds_the_seed_hyper_parameters():
    c = load_config("configs/gpt2-124m.yaml")
    assert (c.model.n_layer, c.model.n_head, c.model.n_embd, c.model.block_size) == (12, 12, 768, 1024)
    assert c.train.total_batch_tokens == 491_520 and (c.train.micro_batch, c.train.seq_len) == ("auto", 1024)
    assert (c.optim.lr, c.optim.min_lr, c.optim.warmup_steps, c.train.max_steps) == (6e-4, 6e-5, 715, 19_073)
    assert c.optim.betas == [0.9, 0.96] and (c.optim.weight_decay, c.optim.eps, c.optim.grad_clip) == (0.1, 1e-8, 1.0)
    assert (c.eval.hellaswag_every, c.eval.sample_every, c.eval.num_samples, c.eval.top_k) == (200, 50, 4, 50)
    assert c.eval.sample_prompt == "Hello this is AI model,"
    # the seed's micro-batch 4 at 8 GPUs: 15 micro-steps (auto may pick a larger one, same batch)
    assert grad_accum_steps(c.train.total_batch_tokens, 4, c.train.seq_len, world_size=8) == 15


def test_demo_config_is_offline_and_explicit():
    c = load_config("configs/demo.yaml")
    assert c.tokenizer.name == "bytes" and c.data.source == "builtin:pydoc" and c.train.device == "cpu"


def test_overrides_apply():
    c = load_config("configs/gpt2-124m.yaml", ["train.max_steps=100", "optim.lr=3e-4", "data.shuffle=true"])
    assert (c.train.max_steps, c.optim.lr, c.data.shuffle) == (100, 3e-4, True)


def test_unknown_key_names_the_nearest_valid_one():
    with pytest.raises(ConfigError, match=r"unknown config key 'train.max_step'.*did you mean 'train.max_steps'"):
        load_config("configs/demo.yaml", ["train.max_step=5"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'optim.learning_rate' in '.*bad.yaml'"):
        load_config(bad)


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"'train.max_steps'.*'abc'.*expected int"):
        load_config("configs/demo.yaml", ["train.max_steps=abc"])


def test_batch_not_divisible_names_all_four_numbers():
    c = load_config("configs/demo.yaml")
    numbers = r"total_batch_tokens \(4096\).*micro_batch \(8\).*seq_len \(128\).*world size \(3\)"
    with pytest.raises(ConfigError, match=numbers):
        grad_accum_steps(c.train.total_batch_tokens, c.train.micro_batch, c.train.seq_len, world_size=3)


def test_secrets_are_redacted():
    c = load_config("configs/demo.yaml", ["checkpoint.storage_options={key: AKIA, secret: hush}"])
    text = to_yaml(c)
    assert "hush" not in text and "AKIA" not in text and "***" in text
    assert "total_batch_tokens: 4096" in text


@pytest.mark.parametrize("override,message", [
    ("train.max_step=5", "did you mean 'train.max_steps'"),
    ("train.max_steps=abc", "expected int"),
    ("train.micro_batch=3", "is not divisible by train.micro_batch (3) x train.seq_len (128) x world size (1)"),
    ("tokenizer.name=bpe", "choose one of gpt2, bytes"),
])
def test_cli_rejects_bad_input_before_writing_anything(tmp_path, override, message):
    out = tmp_path / "out"
    result = run_cli(["-m", "gpt2.train", "configs/demo.yaml", f"data.dir={out}/data",
                      f"checkpoint.dir={out}/ckpt", f"logging.dir={out}/tb", override])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("override,message", [
    ("train.max_steps=0", "'train.max_steps' must be positive, got 0"),
    ("train.max_steps=-5", "'train.max_steps' must be positive"),
    ("optim.lr=-1", "'optim.lr' must be positive"),
    ("optim.eps=0", "'optim.eps' must be positive"),
    ("optim.grad_clip=-1", "'optim.grad_clip' must be positive"),
    ("optim.min_lr=-1e-5", "'optim.min_lr' must be 0 or more"),
    ("optim.min_lr=1", "optim.min_lr (1.0) is above optim.lr"),
    ("optim.weight_decay=-0.1", "'optim.weight_decay' must be 0 or more"),
    ("optim.betas=[0.9,1.5]", "optim.betas must lie in [0, 1)"),
    ("checkpoint.retries=-1", "'checkpoint.retries' must be 0 or more"),
    ("train.log_every=0", "'train.log_every' must be positive"),
    ("train.stop_at_step=400", "train.stop_at_step (400) is after train.max_steps (300)"),
    ("train.hang_timeout_s=-1", "'train.hang_timeout_s' must be 0 or more"),
    ("eval.num_samples=0", "'eval.num_samples' must be positive"),
    ("eval.top_k=0", "'eval.top_k' must be positive"),
    ("eval.val_every=-1", "'eval.val_every' must be 0 or more"),
    ("eval.val_batches=-2", "'eval.val_batches' must be 0 or more"),
    ("data.workers=-1", "'data.workers' must be 0 or more"),
    ("train=5", "'train' in the command line is a section"),
])
def test_values_out_of_range_are_refused(override, message):
    with pytest.raises(ConfigError) as err:
        load_config("configs/demo.yaml", [override])
    assert message in str(err.value)


def test_sampling_settings_matter_only_when_sampling():
    load_config("configs/demo.yaml", ["eval.sample_every=0", "eval.num_samples=0", "eval.top_k=0"])


def test_a_warm_up_longer_than_the_run_is_said(caplog):
    load_config("configs/gpt2-124m.yaml", ["train.max_steps=100"])
    assert "optim.warmup_steps (715) is longer than train.max_steps (100)" in caplog.text


@pytest.mark.parametrize("text,message", [
    ("", "is empty"),
    ("- a\n- b\n", "must be a mapping of sections"),
    ("train:\n  max_steps: ${oc.env:GPT2_TEST_UNSET_VARIABLE}\n", "config key 'train.max_steps'"),
    ("train:\n  max_steps: ${oc.env:GPT2_TEST_TEXT}\n", "could not be converted to Integer"),
])
def test_malformed_config_files_are_config_errors(tmp_path, monkeypatch, text, message):
    monkeypatch.setenv("GPT2_TEST_TEXT", "many")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_every_storage_option_but_the_known_public_ones_is_redacted_and_url_passwords_too():
    c = load_config("configs/demo.yaml", [
        "checkpoint.storage_options={sas: S1, auth: A1, passwd: P1, creds: C1, connection_string: C2, "
        "headers: {Authorization: T1}, endpoint_url: 'http://u:P2@127.0.0.1:8333', region_name: eu}",
        "data.storage_options={client_kwargs: {region_name: us}}",
    ])
    text = to_yaml(c) + json.dumps(to_dict(c))
    for secret in ("S1", "A1", "P1", "C1", "C2", "T1", "P2"):
        assert secret not in text, secret
    assert "http://u:***@127.0.0.1:8333" in text and "region_name: eu" in text and "region_name: us" in text


@pytest.mark.parametrize("world_sizes,cap,expected", [
    ([8, 16], 64, [30, 15, 10, 6, 5, 3, 2, 1]),  # the elastic 8-16 GPU job: 60 and 30 rows per rank
    ([8], 64, [60, 30, 20, 15, 12, 10, 6, 5, 4, 3, 2, 1]),
    ([16], 16, [15, 10, 6, 5, 3, 2, 1]),
    ([1], 64, [60, 48, 40, 32, 30, 24, 20, 16, 15, 12, 10, 8, 6, 5, 4, 3, 2, 1]),
    ([7], 64, []),  # 480 rows cannot split over 7 ranks
    ([1, 2, 3, 4, 5, 6], 64, [8, 4, 2, 1]),  # gcd of 480, 240, 160, 120, 96, 80 rows is 8
])
def test_exact_micro_batches_for_the_124m_batch(world_sizes, cap, expected):
    got = exact_micro_batches(491_520, 1024, world_sizes, cap)
    assert got == expected
    for mb in got:  # each keeps the global batch exact at every world size
        for w in world_sizes:
            assert grad_accum_steps(491_520, mb, 1024, w) * mb * 1024 * w == 491_520


def test_micro_batch_is_a_number_or_auto():
    with pytest.raises(ConfigError, match="train.micro_batch must be a positive number or auto"):
        load_config("configs/demo.yaml", ["train.micro_batch=big"])
    assert load_config("configs/demo.yaml", ["train.micro_batch=auto"]).train.micro_batch == "auto"
