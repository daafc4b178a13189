"""The recipe check on resume: data-moving changes refused (or continued by tokens seen when
allowed), schedule changes said with both learning rates, or continued without a jump."""

from __future__ import annotations

import pytest

from gpt2.config import load_config
from gpt2.errors import ConfigError
from gpt2.optim import lr_at
from gpt2.recipe import continuation, recipe_of


def cfg(*overrides: str):
    return load_config("configs/gpt2-124m.yaml", list(overrides))


def marker(step: int, *overrides: str, data: str = "corpus-a", origin=(0, 0)) -> dict:
    return {"step": step, "recipe": recipe_of(cfg(*overrides), data, None),
            "data_position": {"next_step": step, "origin": list(origin)}}


def test_an_unchanged_recipe_resumes_silently():
    c = continuation(marker(500), cfg(), "corpus-a")
    assert c.origin == (0, 0) and c.lr_phase is None and c.warnings == []


@pytest.mark.parametrize("override,named", [
    ("train.seq_len=512", "train.seq_len: 1024 in the checkpoint, 512 now"),
    ("data.shuffle=true", "data.shuffle: False in the checkpoint, True now"),
    ("train.seed=7", "train.seed: 1337 in the checkpoint, 7 now"),
    ("tokenizer.name=bytes", "the tokenizer (tokenizer.name): gpt2"),
])
def test_a_change_of_what_the_rows_hold_is_refused_naming_it(override, named):
    with pytest.raises(ConfigError) as err:
        continuation(marker(500), cfg(override, "train.allow_batch_change=true"), "corpus-a")
    assert named in str(err.value) and "model.init_from=DIR" in str(err.value)


def test_another_corpus_is_refused():
    with pytest.raises(ConfigError, match="in data.dir .its manifest.: corpus-a in the checkpoint, corpus-b"):
        continuation(marker(500), cfg(), "corpus-b")


def test_a_new_global_batch_is_refused_unless_allowed_then_the_position_continues_by_tokens():
    bigger = "train.total_batch_tokens=983040"
    with pytest.raises(ConfigError, match="train.allow_batch_change=true.*train.total_batch_tokens=491520"):
        continuation(marker(500), cfg(bigger), "corpus-a")
    c = continuation(marker(500), cfg(bigger, "train.allow_batch_change=true"), "corpus-a")
    assert c.origin == (500, 500 * 480)  # 480 rows a step were read before step 500
    assert "continues by tokens seen, at row 240,000" in c.warnings[0]
    # a second change counts from the first one's origin
    again = marker(600, bigger, origin=(500, 240_000))
    c2 = continuation(again, cfg("train.allow_batch_change=true"), "corpus-a")
    assert c2.origin == (600, 240_000 + 100 * 960)


def test_a_longer_schedule_is_said_with_both_learning_rates_or_continued_without_a_jump():
    step, old, new = 19_073, cfg(), cfg("train.max_steps=30000")
    c = continuation(marker(step), new, "corpus-a")
    was, now = lr_at(step, old.optim, 19_073), lr_at(step, new.optim, 30_000)
    assert c.lr_phase is None and f"from {was:.3e}" in c.warnings[0] and f"to {now:.3e}" in c.warnings[0]
    assert "optim.on_schedule_change=continue" in c.warnings[0]

    mid = 10_000
    cont = continuation(marker(mid), cfg("train.max_steps=30000", "optim.on_schedule_change=continue"), "corpus-a")
    start_lr = lr_at(mid, old.optim, 19_073)
    assert cont.lr_phase == (mid, start_lr)
    assert lr_at(mid, new.optim, 30_000, cont.lr_phase) == pytest.approx(start_lr)  # no jump
    assert lr_at(29_999, new.optim, 30_000, cont.lr_phase) == pytest.approx(new.optim.min_lr, rel=1e-3)
    assert lr_at(mid + 1, new.optim, 30_000, cont.lr_phase) < start_lr


def test_a_checkpoint_without_a_recipe_is_checked_against_its_config():
    from gpt2.config import to_dict

    old = {"step": 100, "config": to_dict(cfg())}
    with pytest.raises(ConfigError, match="train.seq_len: 1024 in the checkpoint, 512 now"):
        continuation(old, cfg("train.seq_len=512"), "anything")


def test_a_corpus_is_compared_by_content_where_both_sides_know_it():
    # "names:content": a checkpoint (or manifest) from before shards had hashes knows the names only
    assert continuation(marker(10, data="names1"), cfg(), "names1:c1").warnings == []
    assert continuation(marker(10, data="names1:c1"), cfg(), "names1").warnings == []
    with pytest.raises(ConfigError, match="corpus"):
        continuation(marker(10, data="names1:c1"), cfg(), "names1:c2")  # same names, other bytes
    with pytest.raises(ConfigError, match="corpus"):
        continuation(marker(10, data="names1"), cfg(), "names2:c1")
