"""Config loading: typed settings, every problem at once with its key path, unknown keys rejected."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainerd.core.config import ConfigError, load, parse_size

REPO = Path(__file__).resolve().parent.parent


def test_documented_default_config_loads():
    """configs/trainerd.yaml is valid and its relative paths resolve against its folder."""
    s = load(REPO / "configs" / "trainerd.yaml")
    assert s.train.micro_batch_size >= 1
    assert Path(s.model.path).is_absolute() and Path(s.root).is_absolute()


def test_every_problem_is_reported_at_once(tmp_path):
    """Several bad keys and values produce one error listing each with its path."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  micro_batch_size: 0\n  seq_len: big\nlora:\n  rr: 8\nmemory:\n  limit: lots\n"
                 "model:\n  dtype: fp8\nbogus: 1\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    problems = e.value.problems
    assert "train.micro_batch_size: must be >= 1, got 0" in problems
    assert "train.seq_len: must be an integer, got 'big'" in problems
    assert any(x.startswith("lora.rr: unknown key (did you mean 'r'?)") for x in problems)
    assert any(x.startswith("memory.limit: must be a size") for x in problems)
    assert "model.dtype: must be one of auto, float32, bfloat16, got 'fp8'" in problems
    assert any(x.startswith("bogus: unknown key") for x in problems)
    assert str(p) in str(e.value)


def test_yaml_syntax_error_names_line(tmp_path):
    """Broken YAML is reported with its line and column, not a traceback."""
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  seq_len: [1, 2\n")
    with pytest.raises(ConfigError, match=r"line \d+, column \d+"):
        load(p)


def test_cross_field_checks(tmp_path):
    """memory.soft must be below memory.hard."""
    p = tmp_path / "c.yaml"
    p.write_text("memory:\n  soft: 0.9\n  hard: 0.8\n")
    with pytest.raises(ConfigError, match="memory.soft: must be below memory.hard"):
        load(p)


@pytest.mark.parametrize("text,value", [("12GiB", 12 << 30), ("512MiB", 512 << 20), ("1.5GB", 1_500_000_000),
                                        (1024, 1024), ("2048", 2048), ("1k", 1000)])
def test_parse_size(text, value):
    """Sizes accept binary and decimal units and plain byte counts."""
    assert parse_size(text) == value


def test_empty_file_gives_defaults(tmp_path):
    """An empty config file is valid and yields the documented defaults."""
    p = tmp_path / "c.yaml"
    p.write_text("")
    s = load(p)
    assert s.train.seq_len == 256 and s.memory.soft == 0.85


def test_checkpoint_interval_auto_or_a_number(tmp_path):
    """train.checkpoint_every_s is auto by default (Young/Daly), a number keeps a fixed interval,
    anything else is an error naming the key; checkpoint_async is auto, true or false."""
    p = tmp_path / "c.yaml"
    p.write_text("")
    s = load(p)
    assert (s.train.checkpoint_every_s, s.train.checkpoint_every_steps, s.train.checkpoint_async) == ("auto", 0, "auto")
    p.write_text("train: {checkpoint_every_s: 600, checkpoint_every_steps: 50, checkpoint_async: false}\n")
    s = load(p)
    assert (s.train.checkpoint_every_s, s.train.checkpoint_every_steps, s.train.checkpoint_async) == (600.0, 50, False)
    p.write_text("train: {checkpoint_every_s: often, checkpoint_async: maybe}\n")
    with pytest.raises(ConfigError) as e:
        load(p)
    assert any(x.startswith("train.checkpoint_every_s: must be a number") for x in e.value.problems)
    assert "train.checkpoint_async: must be true, false or auto, got 'maybe'" in e.value.problems
