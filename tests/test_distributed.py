"""Several ranks through torchrun (gloo on CPU): the same training as one process, stops every rank
agrees on, a rank that dies or freezes, two "nodes" through a c10d rendezvous, and the daemon
running a batch on two ranks.

Real processes throughout: ``python -m torch.distributed.run`` starts the real worker; faults are
injected in one rank only (``TRAINERD_FAULT_RANK``). LoRA dropout is 0 here so that runs on one
and on two ranks compute the same function; they differ only in float summation order.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import subprocess_env
from workerutil import make_batch, sample_lines

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LINES = sample_lines(60)
# micro 2 x accum 2: each of two ranks trains one micro-batch of 2 blocks per step
SETTINGS = {"train": {"micro_batch_size": 2, "grad_accum_steps": 2, "checkpoint_every_steps": 2},
            "lora": {"dropout": 0.0}}
TOL = 2e-5  # two ranks vs one: the same sums in another order


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_argv(batch: Path, *, nproc: int = 2, nnodes: int = 1, endpoint: str = "") -> list[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--nnodes", str(nnodes),
            "--max-restarts", "0"]
    argv += ["--standalone"] if nnodes == 1 else ["--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint,
                                                  "--rdzv-id", "test"]
    return [*argv, "-m", "trainerd.worker", str(batch)]


def start(argv: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(argv, env=subprocess_env(TORCH_ELASTIC_SHUTDOWN_TIMEOUT="5", **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)


def run(argv: list[str], timeout: float = 300, **env: str) -> tuple[int, list[dict[str, Any]], str]:
    p = start(argv, **env)
    out, err = p.communicate(timeout=timeout)
    logs = [json.loads(line) for line in out.decode().splitlines() if line.startswith("{")]
    return p.returncode, logs, err.decode()


def result(batch: Path, rank: int = 0) -> dict[str, Any]:
    return json.loads((batch / ("result.json" if rank == 0 else f"result.rank{rank}.json")).read_text())


def adapter(batch: Path) -> dict[str, torch.Tensor]:
    return load_file(str(batch / "final_adapter" / "adapter_model.safetensors"))


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = TOL) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, f"adapters differ by {worst}"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """One batch trained uninterrupted on one process and on two ranks."""
    tmp = tmp_path_factory.mktemp("dist")
    single = make_batch(tmp, tiny_model_dir, LINES, name="single", **SETTINGS)
    rc = subprocess.run([sys.executable, "-m", "trainerd.worker", str(single)], env=subprocess_env(),
                        capture_output=True, timeout=300).returncode
    assert rc == 0
    two = make_batch(tmp, tiny_model_dir, LINES, name="two", **SETTINGS)
    rc, logs, err = run(torchrun_argv(two))
    assert rc == 0, err[-3000:]
    return {"tmp": tmp, "model": tiny_model_dir, "single": single, "two": two, "two_logs": logs}


def test_collectives_sum_gradients_and_the_strongest_stop_wins():
    """dist.reduce_step on two real gloo ranks: gradients, loss and tokens summed (a parameter no rank
    has a gradient for gets zeros); a stop on any rank is every rank's, the strongest reason (memory over
    paused) wins, and then no gradient is summed; agree() ORs its flags."""
    probe = [str(REPO / "tests" / "bin" / "dist_probe.py")]
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    out = subprocess.run([*base, *probe, "-", "-"], env=subprocess_env(), capture_output=True, timeout=120)
    got = sorted((json.loads(x) for x in out.stdout.decode().splitlines() if x.startswith("{")), key=lambda r: r["rank"])
    assert len(got) == 2, out.stderr.decode()[-2000:]
    for r in got:
        assert (r["loss"], r["tokens"], r["agreed"]) == (1.5, 201, None)
        assert r["a"] == [3.0] * 3 and r["b"] == [[30.0, 30.0]] * 2 and r["c"] == [0.0]
        assert r["flags"] == [True, False] and r["agree_reason"] is None
        assert r["gathered"] == [{"r": 0}, {"r": 1}]
    out = subprocess.run([*base, *probe, "paused", "memory"], env=subprocess_env(), capture_output=True, timeout=120)
    got = sorted((json.loads(x) for x in out.stdout.decode().splitlines() if x.startswith("{")), key=lambda r: r["rank"])
    assert [(r["agreed"], r["agree_reason"]) for r in got] == [("memory", "memory")] * 2
    assert [r["a"][0] for r in got] == [1.0, 2.0]  # a stopped step's gradients are not summed


def test_two_ranks_train_the_same_steps_as_one_process(runs):
    """Same data, same effective batch: two ranks give the single process's steps, tokens, losses and
    adapter (to float summation order). Rank 0 writes; rank 1 ends with rank_done; the checkpoint holds
    both ranks' RNG; only rank 0's info lines are logged, each with its rank."""
    single, two = runs["single"], runs["two"]
    r1, r2 = result(single), result(two)
    assert (r2["status"], r2["world_size"], r2["dist_backend"]) == ("done", 2, "gloo")
    assert (r2["step"], r2["total_steps"], r2["tokens"]) == (r1["step"], r1["total_steps"], r1["tokens"])
    assert r2["first_loss"] == pytest.approx(r1["first_loss"], rel=1e-5)
    assert r2["last_loss"] == pytest.approx(r1["last_loss"], rel=1e-4)
    assert_close(adapter(two), adapter(single))
    other = result(two, 1)
    assert (other["status"], other["reason"], other["exit_code"], other["rank"]) == ("done", "rank_done", 0, 1)
    assert not (two / "final_adapter").with_name("final_adapter.rank1").exists()
    newest = sorted((two / "checkpoints").glob("step-*"))[-1]
    rng = torch.load(newest / "rng.pt", weights_only=False)
    assert len(rng["ranks"]) == 2
    logs = runs["two_logs"]
    assert {r["rank"] for r in logs} == {0} | {r["rank"] for r in logs if r["level"] in ("warning", "error")}
    assert [e for e in logs if e["event"] == "ranks_joined"][0]["world_size"] == 2
    assert (two / "eval.json").is_file() and (two / "precision.json").is_file()
    assert json.loads((two / "progress.json").read_text())["world_size"] == 2  # trainerd status: "on 2 ranks"


def test_a_sigterm_to_one_rank_stops_every_rank_at_the_same_step_and_resumes_exactly(runs):
    """SIGTERM to rank 1 alone after step 3: both ranks stop at step 3 with reason shutdown (exit 75 each),
    rank 0 checkpoints step 3; resumed on two ranks the adapter is bit-identical to the uninterrupted
    two-rank run; resumed on one process instead it matches too (summation order apart)."""
    tmp = runs["tmp"]
    batch = make_batch(tmp, runs["model"],
                       LINES, name="term", **SETTINGS)
    rc, _, err = run(torchrun_argv(batch), TRAINERD_FAULT="term_at_step:3", TRAINERD_FAULT_RANK="1")
    assert rc != 0  # torchrun reports any rank's non-zero exit as its failure
    for rank in (0, 1):
        r = result(batch, rank)
        assert (r["status"], r["reason"], r["exit_code"], r["step"]) == ("stopped", "shutdown", 75, 3), err[-2000:]
    assert (batch / "checkpoints" / "step-00000003").is_dir()
    on_one = tmp / "term-on-one"
    shutil.copytree(batch, on_one)
    rc, logs, err = run(torchrun_argv(batch))
    assert rc == 0, err[-2000:]
    started = [e for e in logs if e["event"] == "training_started"][0]
    assert started["resumed_from"] == "step-00000003"
    assert {k: torch.equal(v, adapter(runs["two"])[k]) for k, v in adapter(batch).items()} == \
        {k: True for k in adapter(batch)}
    p = subprocess.run([sys.executable, "-m", "trainerd.worker", str(on_one)], env=subprocess_env(),
                       capture_output=True, timeout=300)
    assert p.returncode == 0, p.stderr.decode()[-2000:]
    assert_close(adapter(on_one), adapter(runs["two"]))


def test_a_killed_rank_ends_the_attempt_within_the_collective_timeout(runs):
    """Rank 1 SIGKILLed after step 3: rank 0 does not hang in its next collective; the attempt ends as a crash
    (rank 0's result says crashed, rank 1 wrote none) well within train.dist_timeout_s, and the checkpoint of
    step 2 stands."""
    batch = make_batch(runs["tmp"], runs["model"],
                       LINES, name="kill", train={**SETTINGS["train"], "dist_timeout_s": 20}, lora=SETTINGS["lora"])
    t0 = time.monotonic()
    rc, _, err = run(torchrun_argv(batch), timeout=120, TRAINERD_FAULT="crash_at_step:3", TRAINERD_FAULT_RANK="1")
    took = time.monotonic() - t0
    assert rc != 0 and took < 20 + 30, took
    assert not (batch / "result.rank1.json").exists()
    r0 = result(batch) if (batch / "result.json").exists() else {"status": "crashed"}
    assert r0["status"] == "crashed", r0
    assert sorted(p.name for p in (batch / "checkpoints").glob("step-*"))[-1] == "step-00000002"


def test_a_frozen_rank_is_a_crash_after_the_collective_timeout_not_a_hang(runs):
    """Rank 1 SIGSTOPped after step 3 (alive, silent): rank 0 gives up its all-reduce after dist_timeout_s
    (5 s here) and crashes; torchrun then ends the frozen rank (SIGTERM, SIGKILL after its shutdown timeout)."""
    batch = make_batch(runs["tmp"], runs["model"],
                       LINES, name="freeze", train={**SETTINGS["train"], "dist_timeout_s": 5}, lora=SETTINGS["lora"])
    t0 = time.monotonic()
    rc, _, err = run(torchrun_argv(batch), timeout=180, TRAINERD_FAULT="freeze_at_step:3", TRAINERD_FAULT_RANK="1")
    assert rc != 0 and time.monotonic() - t0 < 120
    assert result(batch)["status"] == "crashed", err[-2000:]
    assert "timed out" in result(batch)["reason"].lower() or "timeout" in result(batch)["reason"].lower()


def test_back_off_on_every_rank_keeps_the_step(runs):
    """A (CPU-injected) CUDA OOM above micro-batch 1 on both ranks: each backs off alone to micro 1 and
    two micro-batches; the steps are the same steps, so the adapter matches the run without back-off."""
    batch = make_batch(runs["tmp"], runs["model"],
                       LINES, name="oom", **SETTINGS)
    rc, logs, err = run(torchrun_argv(batch), TRAINERD_FAULT="oom_above_micro:1")
    assert rc == 0, err[-2000:]
    backoffs = [e for e in logs if e["event"] == "cuda_oom_backoff"]
    assert {e["rank"] for e in backoffs} == {0, 1}  # warnings: every rank's are in the log
    assert all(e["micro_batch_size"] == 1 for e in backoffs)
    assert result(batch)["effective_batch"] == 4
    assert_close(adapter(batch), adapter(runs["two"]), tol=1e-4)


def test_two_nodes_meet_through_a_c10d_rendezvous(runs):
    """Two launchers with --nnodes 2 (one rank each) on this host, as two machines would run them against
    a shared batch folder: they rendezvous, train, and give the single process's adapter."""
    batch = make_batch(runs["tmp"], runs["model"],
                       LINES, name="nodes", **SETTINGS)
    argv = torchrun_argv(batch, nproc=1, nnodes=2, endpoint=f"127.0.0.1:{_port()}")
    nodes = [start(argv), start(argv)]
    outs = [p.communicate(timeout=300) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1].decode()[-2000:]
    assert result(batch)["world_size"] == 2 and result(batch, 1)["reason"] == "rank_done"
    assert_close(adapter(batch), adapter(runs["single"]))


@pytest.mark.parametrize("fault,first,resumed_from", [
    ("term_at_step:3", ("stopped", "shutdown"), "step-00000003"),
    ("crash_at_step:3", ("crashed", None), "step-00000002"),
])
def test_daemon_runs_a_batch_on_two_ranks_through_a_fault_in_one(daemon_factory, tiny_model_dir, fault, first,
                                                                    resumed_from):
    """train.nproc_per_node 2 in the daemon: torchrun starts the ranks (ranks_started). Rank 1 alone is told
    to stop (SIGTERM) or is killed after step 3: torchrun exits 1 either way, and the ranks' own results
    decide: every rank stopped at step 3 (resumed from step 3), or a crash (retried from step 2's
    checkpoint). Without the fault (the daemon restarted) the batch finishes on two ranks."""
    d = daemon_factory(model_dir=tiny_model_dir, train={**SETTINGS["train"], "nproc_per_node": 2, "dist_timeout_s": 20},
                       lora=SETTINGS["lora"])
    d.start(env={"TRAINERD_FAULT": fault, "TRAINERD_FAULT_RANK": "1"})
    d.drop("a.jsonl", LINES)
    exited = d.wait_for(lambda: d.events("worker_exited"), 240)[0]
    assert exited["exit_code"] != 0
    assert (exited["result_status"], exited["result_reason"] if first[1] else None) == first, exited
    assert d.terminate() == 0  # a fault that fires at step 3 of every attempt would fire again: the
    d.start(env={"TRAINERD_FAULT": None, "TRAINERD_FAULT_RANK": None})  # daemon goes on without it
    b = d.wait_for(lambda: (x := d.batch("a.jsonl")) and x["state"] in ("done", "failed", "rejected") and x, 300)
    assert b["state"] in ("done", "rejected"), b
    starts = d.events("ranks_started")
    assert len(starts) >= 2 and all(s["world_size"] == 2 for s in starts)
    assert [e["resumed_from"] for e in d.events("training_started")][:2] == [None, resumed_from]
    assert (d.root / "adapters" / ("1" if b["state"] == "done" else "rejected")).exists()
    assert d.terminate() == 0
