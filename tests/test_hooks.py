"""Publish hooks through the real daemon (fake workers) with a real hook script (tests/bin/hook_probe.py):
the environment of a publish, a rejection, a promote and a rollback; the timeout; a failure counted
while the publish stands; a slow hook never holding the loop; a hook whose daemon was killed runs again;
and examples/hooks/vllm-load-lora against a stdlib HTTP stub of vLLM's adapter endpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from conftest import subprocess_env
from support.procsig import has_signal
from test_cancel import FAKE_ENV, plan_line, trainerd
from test_supervisor import FAKE_WORKER_CONFIG
from trainerd.supervisor.ledger import Ledger

REPO = Path(__file__).resolve().parent.parent
PROBE = Path(__file__).parent / "bin" / "hook_probe.py"
VLLM_HOOK = REPO / "examples" / "hooks" / "vllm-load-lora"


def hook_daemon(daemon_factory, tmp_path, mode="ok", timeout_s=30, **kw):
    record = tmp_path / "hook-calls.jsonl"
    d = daemon_factory(model_dir=tmp_path / "no-model", env=FAKE_ENV, **FAKE_WORKER_CONFIG,
                       publish={"hook": [sys.executable, str(PROBE), str(record), mode], "hook_timeout_s": timeout_s},
                       **kw)
    return d, record


def calls(record: Path) -> list[dict]:
    try:
        return [json.loads(x) for x in record.read_text().splitlines()]
    except FileNotFoundError:
        return []


def gone(pid: int) -> bool:
    """Exited (a zombie waiting for the test process, its subreaper, counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def counter(d, name: str) -> int:
    led = Ledger.open_readonly(d.root / "state.db")
    try:
        return led.counter(name)
    finally:
        led.close()


def test_hook_contract_publish_reject_promote_rollback(daemon_factory, tmp_path):
    """Every publish (blessed, forced by promote, rollback) and every rejection runs the hook once, in
    order, with TRAINERD_* saying what happened; its output is logged."""
    d, record = hook_daemon(daemon_factory, tmp_path)
    d.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: len(calls(record)) == 1)
    d.drop("b.jsonl", [plan_line(["done:nan"], "b")])
    d.wait_for(lambda: len(calls(record)) == 2)
    assert d.state_of("b.jsonl") == "rejected"
    assert trainerd(d.root, "promote", "2").returncode == 0
    d.wait_for(lambda: len(calls(record)) == 3)
    assert trainerd(d.root, "rollback", "1").returncode == 0
    d.wait_for(lambda: len(calls(record)) == 4)
    envs = [c["env"] for c in calls(record)]
    real = lambda p: os.path.realpath(d.root / p)  # noqa: E731
    assert envs[0] == {"TRAINERD_EVENT": "published", "TRAINERD_ADAPTER_DIR": real("adapters/1"),
                       "TRAINERD_VERSION": "1", "TRAINERD_PREVIOUS_VERSION": "", "TRAINERD_CURRENT_VERSION": "1",
                       "TRAINERD_BATCH": "1", "TRAINERD_FILE": "a.jsonl",
                       "TRAINERD_DECISION": "ungated",  # the fake worker evaluates on nothing
                       "TRAINERD_ROOT": str(d.root)}
    assert (envs[1]["TRAINERD_EVENT"], envs[1]["TRAINERD_ADAPTER_DIR"], envs[1]["TRAINERD_VERSION"],
            envs[1]["TRAINERD_DECISION"], envs[1]["TRAINERD_FILE"], envs[1]["TRAINERD_CURRENT_VERSION"]) == (
        "rejected", real("adapters/rejected/000002"), "", "rejected", "b.jsonl", "1")
    assert (envs[2]["TRAINERD_VERSION"], envs[2]["TRAINERD_DECISION"], envs[2]["TRAINERD_ADAPTER_DIR"],
            envs[2]["TRAINERD_PREVIOUS_VERSION"]) == ("2", "forced", real("adapters/2"), "1")
    assert (envs[3]["TRAINERD_VERSION"], envs[3]["TRAINERD_DECISION"], envs[3]["TRAINERD_BATCH"]) == (
        "3", "rollback", "1")
    d.wait_for(lambda: len(d.events("hook_succeeded")) == 4)
    out = [e["text"] for e in d.events("hook_output")]
    assert "probe saw published version=1" in out and "probe stderr line" in out
    assert counter(d, "hook_runs") == 4 and counter(d, "hook_failures") == 0
    assert not list((d.root / "hooks" / "pending").iterdir())
    assert d.terminate() == 0


def test_a_failing_hook_is_counted_and_the_publish_stands(daemon_factory, tmp_path):
    """Exit 3: hook_failed logged with its output, counted; version 1 stays published and current."""
    d, record = hook_daemon(daemon_factory, tmp_path, mode="fail")
    d.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: d.events("hook_failed"))
    failed = d.events("hook_failed")[0]
    assert failed["reason"] == "exit code 3" and failed["version"] == 1 and failed["hook_failures"] == 1
    assert os.readlink(d.root / "adapters" / "current") == "1" and d.state_of("a.jsonl") == "done"
    assert counter(d, "hook_failures") == 1
    assert d.terminate() == 0


def test_a_hook_past_its_timeout_is_killed_and_counted(daemon_factory, tmp_path):
    """A hook sleeping past publish.hook_timeout_s is SIGTERMed (its group), logged as timed out and
    counted as a failure; the publish stands."""
    d, record = hook_daemon(daemon_factory, tmp_path, mode="sleep:60", timeout_s=1)
    d.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: d.events("hook_failed"), 30)
    assert d.events("hook_timed_out") and "timed out" in d.events("hook_failed")[0]["reason"]
    pid = calls(record)[0]["pid"]
    d.wait_for(lambda: gone(pid))
    assert counter(d, "hook_failures") == 1 and os.readlink(d.root / "adapters" / "current") == "1"
    assert d.terminate() == 0


def test_a_slow_hook_never_holds_the_loop(daemon_factory, tmp_path):
    """While the first publish's hook sleeps 6 s, the loop claims, trains and publishes the next batch;
    the hooks then run in publish order."""
    d, record = hook_daemon(daemon_factory, tmp_path, mode="sleep:6")
    d.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: len(calls(record)) == 1)
    t0 = time.monotonic()
    d.drop("b.jsonl", [plan_line(["done"], "b")])
    d.wait_for(lambda: d.state_of("b.jsonl") == "done")
    assert time.monotonic() - t0 < 5 and len(calls(record)) == 1, "b was held behind a's hook"
    d.wait_for(lambda: len(calls(record)) == 2, 30)
    assert [c["env"]["TRAINERD_VERSION"] for c in calls(record)] == ["1", "2"]
    assert d.terminate() == 0


def test_a_hook_interrupted_by_a_killed_daemon_runs_again(daemon_factory, tmp_path):
    """SIGKILL the daemon while a hook runs: the next start stops the leftover hook and runs it again."""
    d, record = hook_daemon(daemon_factory, tmp_path, mode="sleep:60")
    d.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: len(calls(record)) == 1)
    first = calls(record)[0]["pid"]
    d.kill()
    assert os.path.exists(f"/proc/{first}")  # the hook outlived its daemon (its own session)
    d.config_data["publish"]["hook"][-1] = "ok"
    d.config.write_text(json.dumps(d.config_data))
    d.start()
    d.wait_for(lambda: len(calls(record)) == 2)
    assert calls(record)[1]["env"]["TRAINERD_VERSION"] == "1"
    d.wait_for(lambda: d.events("leftover_hook_stopped") and d.events("hook_succeeded"))
    d.wait_for(lambda: gone(first), 10)
    assert d.terminate() == 0


def _ignores_sigterm(pid: int) -> bool:
    return has_signal(pid, signal.SIGTERM, "SigIgn")


def _running_hook_with_helper(daemon_factory, tmp_path):
    """A daemon whose publish hook is running, with a helper in its group that ignores SIGTERM."""
    d, record = hook_daemon(daemon_factory, tmp_path, mode="helper:60")
    d.start()
    d.drop("a.jsonl", [plan_line(["done"], "a")])
    d.wait_for(lambda: len(calls(record)) == 1)
    hook, helper = calls(record)[0]["pid"], calls(record)[0]["helper"]
    d.wait_for(lambda: _ignores_sigterm(helper), 10)
    return d, record, hook, helper


def test_a_hook_helper_that_ignores_sigterm_ends_with_the_daemon(daemon_factory, tmp_path):
    """The daemon stops while a hook runs whose helper ignores SIGTERM: the hook's whole group ends with
    it (SIGKILL after the leader's exit), so no part of the hook outlives the record of it."""
    d, record, hook, helper = _running_hook_with_helper(daemon_factory, tmp_path)
    assert d.terminate() == 0
    assert d.events("hook_interrupted")
    d.wait_for(lambda: gone(hook) and gone(helper), 10)


def test_a_killed_daemons_hook_group_is_stopped_even_when_its_leader_died(daemon_factory, tmp_path):
    """SIGKILL the daemon, then the hook's leader: its helper still holds the group. The next start
    stops that group before it runs the event again — never two runs of one event at once."""
    d, record, hook, helper = _running_hook_with_helper(daemon_factory, tmp_path)
    d.kill()
    os.kill(hook, signal.SIGKILL)
    d.wait_for(lambda: gone(hook), 10)
    assert not gone(helper)
    d.config_data["publish"]["hook"][-1] = "ok"
    d.config.write_text(json.dumps(d.config_data))
    d.start()
    d.wait_for(lambda: len(calls(record)) == 2)
    assert d.events("leftover_hook_stopped")
    assert gone(helper), "the rerun started while the first run's helper was alive"
    assert d.terminate() == 0


# --- examples/hooks/vllm-load-lora against a stub of vLLM's endpoints -----------------------------


class _Stub:
    """vLLM's runtime LoRA endpoints, recorded: load, unload, and /v1/models listing what is loaded."""

    def __init__(self, fail_load: bool = False):
        self.requests: list[tuple[str, str, dict | None]] = []
        self.loaded: dict[str, str] = {}
        self.fail_load = fail_load
        stub = self

        class H(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _reply(self, code: int, body: object) -> None:
                data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                stub.requests.append(("GET", self.path, None))
                if self.path != "/v1/models":
                    return self._reply(404, {"error": "no such path"})
                models = [{"id": "base-model", "object": "model"}] + [
                    {"id": n, "object": "model", "parent": "base-model", "root": p} for n, p in stub.loaded.items()]
                self._reply(200, {"object": "list", "data": models})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(("POST", self.path, body))
                assert self.headers["Content-Type"] == "application/json"
                if self.path == "/v1/load_lora_adapter":
                    if stub.fail_load:
                        return self._reply(500, "internal error")
                    if body["lora_name"] in stub.loaded:
                        return self._reply(400, f"The lora adapter '{body['lora_name']}' has already been loaded.")
                    stub.loaded[body["lora_name"]] = body["lora_path"]
                    return self._reply(200, f"Success: LoRA adapter '{body['lora_name']}' added successfully.")
                if self.path == "/v1/unload_lora_adapter":
                    if stub.loaded.pop(body["lora_name"], None) is None:
                        return self._reply(404, "not found")
                    return self._reply(200, "Success")
                self._reply(404, {"error": "no such path"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = _Stub()
    yield s
    s.close()


def run_hook(url: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(VLLM_HOOK)], env=subprocess_env(VLLM_URL=url, **env), capture_output=True,
                          text=True, timeout=60)


def test_vllm_hook_loads_the_new_version_then_unloads_the_old(stub, tmp_path):
    """Version 1 is loaded as trainerd-v1; version 2 is loaded as trainerd-v2, then v1 is unloaded;
    running version 2's hook again (after a crash) is still a success; a rejection does nothing."""
    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    r = run_hook(stub.url, TRAINERD_EVENT="published", TRAINERD_VERSION="1", TRAINERD_PREVIOUS_VERSION="",
                 TRAINERD_ADAPTER_DIR=str(tmp_path / "1"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert stub.requests == [("POST", "/v1/load_lora_adapter", {"lora_name": "trainerd-v1", "lora_path": str(tmp_path / "1")}),
                             ("GET", "/v1/models", None)]
    stub.requests.clear()
    r = run_hook(stub.url, TRAINERD_EVENT="published", TRAINERD_VERSION="2", TRAINERD_PREVIOUS_VERSION="1",
                 TRAINERD_ADAPTER_DIR=str(tmp_path / "2"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert stub.requests == [("POST", "/v1/load_lora_adapter", {"lora_name": "trainerd-v2", "lora_path": str(tmp_path / "2")}),
                             ("GET", "/v1/models", None),
                             ("POST", "/v1/unload_lora_adapter", {"lora_name": "trainerd-v1"})]
    assert stub.loaded == {"trainerd-v2": str(tmp_path / "2")}
    r = run_hook(stub.url, TRAINERD_EVENT="published", TRAINERD_VERSION="2", TRAINERD_PREVIOUS_VERSION="1",
                 TRAINERD_ADAPTER_DIR=str(tmp_path / "2"))
    assert r.returncode == 0 and stub.loaded == {"trainerd-v2": str(tmp_path / "2")}
    stub.requests.clear()
    r = run_hook(stub.url, TRAINERD_EVENT="rejected", TRAINERD_VERSION="", TRAINERD_ADAPTER_DIR=str(tmp_path))
    assert r.returncode == 0 and stub.requests == []


def test_vllm_hook_fails_when_the_load_fails(tmp_path):
    """A server error on the load is the hook's failure (exit 1): trainerd counts it; nothing is unloaded."""
    s = _Stub(fail_load=True)
    try:
        s.loaded["trainerd-v1"] = "/x"
        r = run_hook(s.url, TRAINERD_EVENT="published", TRAINERD_VERSION="2", TRAINERD_PREVIOUS_VERSION="1",
                     TRAINERD_ADAPTER_DIR=str(tmp_path), VLLM_LORA_PREFIX="trainerd")
        assert r.returncode == 1 and '"status": 500' in r.stdout
        assert [p for m, p, _ in s.requests] == ["/v1/load_lora_adapter"] and "trainerd-v1" in s.loaded
    finally:
        s.close()
    r = run_hook("http://127.0.0.1:9", TRAINERD_EVENT="published", TRAINERD_VERSION="2", TRAINERD_ADAPTER_DIR="/x")
    assert r.returncode == 1  # no server at all
