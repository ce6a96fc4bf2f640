"""`model.path` as a folder or a Hugging Face model id: how the config reads it, the cached snapshot
found without huggingface_hub (and agreed on by huggingface_hub itself), the base model's identity
for a hub id, the worker training on one, and `trainerd run` refusing one it cannot fetch (offline)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path


from conftest import subprocess_env
from trainerd.supervisor.basemodel import Watched, identity, short
from trainerd.core.config import load
from trainerd.core.modelref import is_hub_id, local_dir, resolve_setting
from trainerd.worker.fetch import files_to_fetch
from workerutil import make_batch, run_worker, sample_lines

MODEL_ID = "trainerd-tests/tiny-llama"


def make_cache(cache: Path, model_dir: Path, rev: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """A Hugging Face hub cache holding ``model_dir`` as MODEL_ID at revision ``rev``, laid out as
    huggingface_hub lays it out (blobs, a snapshot of links to them, refs/main)."""
    repo = cache / ("models--" + MODEL_ID.replace("/", "--"))
    snap = repo / "snapshots" / rev
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for f in model_dir.iterdir():
        if f.is_file():
            blob = repo / "blobs" / f"{rev[:8]}-{f.name}"
            shutil.copy(f, blob)
            (snap / f.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(rev)
    return snap


def test_the_config_reads_a_folder_or_a_hub_id(tmp_path):
    """An existing folder, or a value starting with / ./ ../ ~, is a folder (absolute); any other
    org/name is a hub id kept as written; a bare name is a folder."""
    (tmp_path / "models" / "m").mkdir(parents=True)
    assert resolve_setting("models/m", tmp_path) == str(tmp_path / "models" / "m")
    assert resolve_setting("./org/name", tmp_path) == str(tmp_path / "org" / "name")
    assert resolve_setting("../x/y", tmp_path / "models") == str(tmp_path / "x" / "y")
    assert resolve_setting("HuggingFaceTB/SmolLM2-135M-Instruct", tmp_path) == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve_setting("gpt2", tmp_path) == str(tmp_path / "gpt2")
    assert is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct") and not is_hub_id(str(tmp_path / "models" / "m"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: HuggingFaceTB/SmolLM2-135M-Instruct}\n")
    assert load(cfg).model.path == "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_the_cached_snapshot_is_found_as_huggingface_hub_finds_it(tmp_path, tiny_model_dir, monkeypatch):
    """local_dir(org/name) is the snapshot refs/main names, the same folder huggingface_hub resolves
    offline; None before the model is cached."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert local_dir(MODEL_ID) is None
    snap = make_cache(tmp_path / "hub", tiny_model_dir)
    assert local_dir(MODEL_ID) == snap
    from huggingface_hub import snapshot_download

    assert Path(snapshot_download(MODEL_ID, local_files_only=True, cache_dir=tmp_path / "hub")) == snap


def test_a_hub_models_identity_is_its_files_and_a_new_revision_is_another_base(tmp_path, tiny_model_dir,
                                                                              monkeypatch):
    """The identity of org/name is that of its snapshot's files (the same files in a folder compare
    equal), shown as org/name@revision; a new revision with other weights is another base."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    make_cache(tmp_path / "hub", tiny_model_dir, rev="a" * 40)
    w = Watched(MODEL_ID)
    first = w.get()
    assert first is not None and first["id"] == identity(tiny_model_dir)["id"]
    assert short(first).startswith(f"{MODEL_ID}@aaaaaaaaaaaa (")
    other = tmp_path / "other"
    shutil.copytree(tiny_model_dir, other)
    weights = next(other.glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    make_cache(tmp_path / "hub", other, rev="b" * 40)  # the hub's next revision, now what main names
    ref = tmp_path / "hub" / ("models--" + MODEL_ID.replace("/", "--")) / "refs" / "main"
    ref.write_text("a" * 40)
    assert w.get()["id"] == first["id"]  # the cache's main still the first revision: the same base
    ref.write_text("b" * 40)
    second = w.get()
    assert second["id"] != first["id"] and second["revision"] == "b" * 40


def test_only_the_files_a_causal_lm_loads_are_fetched():
    """From a repository listing: top-level JSON, tokenizer files and safetensors weights; .bin only
    without safetensors; never the ONNX, GGUF or run folders."""
    names = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "merges.txt",
             "vocab.json", "model.safetensors", "pytorch_model.bin", "onnx/model.onnx", "onnx/config.json",
             "runs/events.out", "README.md", "model.Q4_K_M.gguf", "special_tokens_map.json"]
    assert files_to_fetch(names) == ["config.json", "generation_config.json", "merges.txt", "model.safetensors",
                                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json",
                                     "vocab.json"]
    assert "pytorch_model.bin" in files_to_fetch(["config.json", "pytorch_model.bin"])


def test_the_worker_trains_on_a_cached_hub_model_offline(tmp_path, tiny_model_dir):
    """A batch whose model.path is org/name trains (offline) from the cached snapshot, and its lineage
    names the hub id."""
    make_cache(tmp_path / "hub", tiny_model_dir)
    batch = make_batch(tmp_path, tiny_model_dir, sample_lines(8))
    settings = (batch / "settings.json").read_text().replace(str(tiny_model_dir), MODEL_ID)
    (batch / "settings.json").write_text(settings)
    rc, result, logs = run_worker(batch, env=subprocess_env(HF_HUB_CACHE=str(tmp_path / "hub")))
    assert rc == 0, result
    loaded = next(rec for rec in logs if rec.get("event") == "model_loaded")
    assert loaded["path"] == str(tmp_path / "hub" / "models--trainerd-tests--tiny-llama" / "snapshots" /
                                 "0123456789abcdef0123456789abcdef01234567")
    assert json.loads((batch / "final_adapter" / "trainerd.json").read_text())["base_model"] == MODEL_ID


def test_run_refuses_a_hub_model_it_cannot_fetch(tmp_path):
    """`trainerd run` with model.path org/name not in the cache and the hub unreachable (offline):
    exit 69 naming the model, before it creates the root."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"root: {tmp_path / 'root'}\nmodel: {{path: {MODEL_ID}}}\n")
    env = subprocess_env(HF_HUB_CACHE=str(tmp_path / "hub"))
    r = subprocess.run([sys.executable, "-m", "trainerd", "run", "--config", str(cfg)], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 69, r.stderr
    assert f"model.path {MODEL_ID} is not in the Hugging Face cache and cannot be fetched now" in r.stderr
    assert "offline mode is enabled" in r.stderr.lower() or "offline" in r.stderr.lower()
    assert not (tmp_path / "root").exists()
