"""Bad configurations: every bad key named with its path, and a daemon that refuses to start.

The loader's message for each kind of mistake is checked in-process, from a table
(``trainerd.core.config.load`` raising ``ConfigError``: what ``trainerd run`` prints to stderr).
A handful of cases then start the real daemon (`trainerd run --config FILE`) to prove what the
operator sees: exit 78, every bad key named on stderr, no traceback, and nothing created (no
root, no ledger). tests/test_config.py checks the loader's rules themselves.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import subprocess_env
from support.config import config_dict
from trainerd.core.config import ConfigError, load

EX_CONFIG = 78


def run_daemon(cfg: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "trainerd", "run", "--config", str(cfg)], env=subprocess_env(),
                          capture_output=True, text=True, timeout=timeout)


def _yaml(tmp: Path, body: str) -> Path:
    cfg = tmp / "trainerd.yaml"
    cfg.write_text(f"root: {tmp}/root\n" + body)
    return cfg


# (id, YAML added after `root:`, the line stderr must contain)
CASES = [
    ("model.dtype", "model: {dtype: fp8}\n", "model.dtype: must be one of auto, float32, bfloat16, got 'fp8'"),
    ("model.device", "model: {device: tpu}\n", "model.device: must be one of auto, cpu, cuda, got 'tpu'"),
    ("model.path-empty", "model: {path: '  '}\n", "model.path: must not be empty"),
    ("model.path-number", "model: {path: 5}\n", "model.path: must be a string, got 5"),
    ("lora.r", "lora: {r: 0}\n", "lora.r: must be >= 1, got 0"),
    ("lora.alpha", "lora: {alpha: 0}\n", "lora.alpha: must be > 0.0, got 0.0"),
    ("lora.dropout", "lora: {dropout: 1.5}\n", "lora.dropout: must be <= 0.99, got 1.5"),
    ("lora.target_modules", "lora: {target_modules: [q_proj, 3]}\n", "lora.target_modules: must be a list of names"),
    ("lora.target_modules-empty", "lora: {target_modules: []}\n", "lora.target_modules: must not be empty"),
    ("train.seq_len", "train: {seq_len: 4}\n", "train.seq_len: must be >= 8, got 4"),
    ("train.seq_len-string", "train: {seq_len: big}\n", "train.seq_len: must be an integer, got 'big'"),
    ("train.micro_batch_size", "train: {micro_batch_size: 0}\n", "train.micro_batch_size: must be >= 1, got 0"),
    ("train.grad_accum_steps-bool", "train: {grad_accum_steps: true}\n",
     "train.grad_accum_steps: must be an integer, got True"),
    ("train.learning_rate", "train: {learning_rate: 2}\n", "train.learning_rate: must be <= 1.0, got 2.0"),
    ("train.epochs", "train: {epochs: 0}\n", "train.epochs: must be >= 1, got 0"),
    ("train.keep_checkpoints", "train: {keep_checkpoints: 0}\n", "train.keep_checkpoints: must be >= 1, got 0"),
    ("train.gradient_checkpointing", "train: {gradient_checkpointing: 'yes please'}\n",
     "train.gradient_checkpointing: must be true or false, got 'yes please'"),
    ("data.max_bad_fraction", "data: {max_bad_fraction: 1.5}\n", "data.max_bad_fraction: must be <= 1.0, got 1.5"),
    ("data.max_line_bytes", "data: {max_line_bytes: 8}\n", "data.max_line_bytes: must be >= 16, got 8"),
    ("data.max_line_bytes-unit", "data: {max_line_bytes: 12 parsecs}\n", "data.max_line_bytes: "),
    ("memory.limit", "memory: {limit: lots}\n", "memory.limit: "),
    ("memory.soft-above-hard", "memory: {soft: 0.9, hard: 0.8}\n", "memory.soft: must be below memory.hard"),
    ("memory.interval_ms", "memory: {interval_ms: 5}\n", "memory.interval_ms: must be >= 10, got 5"),
    ("retry.max_attempts", "retry: {max_attempts: 0}\n", "retry.max_attempts: must be >= 1, got 0"),
    ("retry.backoff_max_s", "retry: {backoff_s: 10, backoff_max_s: 1}\n",
     "retry.backoff_max_s: must be >= retry.backoff_s (10.0), got 1.0"),
    ("supervisor.rescan_s", "supervisor: {rescan_s: 0}\n", "supervisor.rescan_s: must be >= 0.1, got 0.0"),
    ("disk.min_free_bytes", "disk: {min_free_bytes: -1}\n", "disk.min_free_bytes: "),
    ("log.level", "log: {level: loud}\n", "log.level: must be one of debug, info, warning, error, got 'loud'"),
    ("log.format", "log: {format: xml}\n", "log.format: must be one of auto, json, console, got 'xml'"),
    ("unknown-top", "trian: {seq_len: 64}\n", "trian: unknown key (did you mean 'train'?)"),
    ("unknown-nested", "lora: {rr: 8}\n", "lora.rr: unknown key (did you mean 'r'?)"),
    ("section-not-mapping", "train: 5\n", "train: must be a mapping, got int"),
]


# Started as a real daemon as well: an unknown key with its suggestion, and a cross-check.
DAEMON_CASES = ["unknown-top", "memory.soft-above-hard"]


@pytest.mark.parametrize("case_id,body,needle", CASES, ids=[c[0] for c in CASES])
def test_loader_names_bad_key(tmp_path, case_id, body, needle):
    """Loading the file raises ConfigError naming the bad key with its path and the file."""
    cfg = _yaml(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load(cfg)
    assert any(needle in p for p in e.value.problems), e.value.problems
    assert str(cfg) in str(e.value), "the message must say which file is wrong"
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("case_id,body,needle", [c for c in CASES if c[0] in DAEMON_CASES], ids=DAEMON_CASES)
def test_daemon_refuses_bad_key(tmp_path, case_id, body, needle):
    """The daemon exits 78 before doing anything, and stderr names the bad key with its path."""
    cfg = _yaml(tmp_path, body)
    r = run_daemon(cfg)
    assert r.returncode == EX_CONFIG, r.stderr
    assert needle in r.stderr, r.stderr
    assert str(cfg) in r.stderr, "the message must say which file is wrong"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "root").exists(), "a daemon with a bad config must not create its root"


def test_every_bad_key_is_named_in_one_go(tmp_path):
    """With all of the above mistakes in one file, one start names every one of them (no fix-one-rerun loop)."""
    merged: dict = {}
    for _, body, _ in CASES:
        if body.startswith("trian") or body.startswith("train: 5"):
            continue
        for section, values in yaml.safe_load(body).items():
            merged.setdefault(section, {}).update(values)
    merged["trian"] = {"seq_len": 64}
    merged["root"] = str(tmp_path / "root")
    cfg = tmp_path / "all.yaml"
    cfg.write_text(json.dumps(merged))
    r = run_daemon(cfg)
    assert r.returncode == EX_CONFIG
    lines = [l.strip() for l in r.stderr.splitlines()]
    for key in ("model.dtype", "model.device", "lora.r", "lora.alpha", "lora.dropout", "lora.target_modules",
                "train.seq_len", "train.micro_batch_size", "train.grad_accum_steps", "train.learning_rate",
                "train.epochs", "train.keep_checkpoints", "train.gradient_checkpointing", "data.max_bad_fraction",
                "data.max_line_bytes", "memory.limit", "memory.interval_ms", "retry.max_attempts",
                "supervisor.rescan_s", "disk.min_free_bytes", "log.level", "log.format", "trian", "lora.rr"):
        assert any(l.startswith(key + ":") for l in lines), f"{key} not named:\n{r.stderr}"
    assert not (tmp_path / "root").exists()


# what is wrong with the file (_unreadable writes it) -> the one-line reason
UNREADABLE = {"yaml-syntax": "column 1: not valid YAML", "not-utf8": "not UTF-8", "missing": "cannot read config",
              "a-directory": "cannot read config", "top-level-list": "<top>: must be a mapping"}
# Started as a real daemon as well: broken YAML, and a file that is not a mapping.
DAEMON_UNREADABLE = ["yaml-syntax", "top-level-list"]


def _unreadable(tmp_path: Path, what: str) -> Path:
    cfg = tmp_path / "trainerd.yaml"
    if what == "yaml-syntax":
        cfg.write_text(f"root: {tmp_path}/root\ntrain: [1, 2\n")
    elif what == "not-utf8":
        cfg.write_bytes(b"root: /tmp/x\xff\xfe\n")
    elif what == "a-directory":
        cfg.mkdir()
    elif what == "top-level-list":
        cfg.write_text("- root\n- model\n")
    return cfg


@pytest.mark.parametrize("what", list(UNREADABLE))
def test_loader_refuses_unreadable_config(tmp_path, what):
    """A config that is not YAML, not UTF-8, missing, a directory or a list: ConfigError with a one-line reason."""
    with pytest.raises(ConfigError) as e:
        load(_unreadable(tmp_path, what))
    assert len(e.value.problems) == 1 and UNREADABLE[what] in e.value.problems[0], e.value.problems
    assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("what", DAEMON_UNREADABLE)
def test_daemon_refuses_unreadable_config(tmp_path, what):
    """A config that is not YAML or not a mapping: the daemon exits 78 with a one-line reason."""
    r = run_daemon(_unreadable(tmp_path, what))
    assert r.returncode == EX_CONFIG, r.stderr
    assert UNREADABLE[what] in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "root").exists()


def test_missing_model_is_a_config_error(tmp_path):
    """A model.path with no model in it stops the daemon at start (exit 78) instead of letting every
    file dropped in fail its worker and land in failed/ for a mistake in the config."""
    cfg = tmp_path / "trainerd.yaml"
    cfg.write_text(json.dumps(config_dict(tmp_path / "root", tmp_path / "no-such-model")))
    r = run_daemon(cfg)
    assert r.returncode == EX_CONFIG, r.stderr
    assert f"model.path: no model folder at {tmp_path}/no-such-model" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "root").exists()


def test_root_that_cannot_be_created_is_a_config_error(tmp_path, tiny_model_dir):
    """`root` under a regular file cannot be created: exit 78 naming the root, no traceback."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    cfg = tmp_path / "trainerd.yaml"
    cfg.write_text(json.dumps(config_dict(blocker / "root", tiny_model_dir)))
    r = run_daemon(cfg)
    assert r.returncode == EX_CONFIG, r.stderr
    assert f"cannot create the root {blocker}/root" in r.stderr and "Traceback" not in r.stderr


def test_missing_config_flag_is_refused(tmp_path):
    """`trainerd run` with neither --config nor $TRAINERD_CONFIG refuses to guess: exit 2, a usage
    error (no config was read, so none is bad; docs/cli.md)."""
    env = subprocess_env()
    env.pop("TRAINERD_CONFIG", None)
    r = subprocess.run([sys.executable, "-m", "trainerd", "run"], env=env, capture_output=True, text=True,
                       timeout=30, cwd=tmp_path)
    assert r.returncode == 2 and "--config FILE is required" in r.stderr
    assert os.listdir(tmp_path) == []
