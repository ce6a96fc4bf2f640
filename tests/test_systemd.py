"""The systemd side without a running systemd: the unit files, the installer, the notify protocol."""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from trainerd.supervisor.sdnotify import Notifier

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "trainerd.service"
INSTALL = REPO / "scripts" / "install-service"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install -y systemd)")


# --- the notify protocol on a real AF_UNIX datagram socket ------------------------------------


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    """A bound datagram socket standing in for systemd's, with NOTIFY_SOCKET pointing at it."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _recv(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def test_notify_messages_reach_a_real_datagram_socket(notify_socket):
    """ready/status/watchdog/stopping each send one datagram with the sd_notify fields."""
    n = Notifier.from_env()
    assert n.enabled
    assert n.ready(status="idle, 0 queued")
    assert _recv(notify_socket) == {"READY": "1", "STATUS": "idle, 0 queued"}
    assert n.status("training 000001 step 3/10")
    assert _recv(notify_socket) == {"STATUS": "training 000001 step 3/10"}
    assert n.watchdog()
    assert _recv(notify_socket) == {"WATCHDOG": "1"}
    assert n.stopping()
    assert _recv(notify_socket) == {"STOPPING": "1"}
    n.close()


def test_notify_newline_in_status_cannot_inject_a_field(notify_socket):
    """A newline inside STATUS is flattened, so it cannot smuggle in READY=1 or another field."""
    Notifier.from_env().status("bad file\nREADY=1")
    assert _recv(notify_socket) == {"STATUS": "bad file READY=1"}


def test_notify_abstract_socket(monkeypatch):
    """An '@name' NOTIFY_SOCKET is an abstract-namespace socket (leading NUL), as systemd hands out."""
    name = f"trainerd-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2.0)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier.from_env().ready()
        assert _recv(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_notify_is_a_noop_without_systemd(monkeypatch):
    """Without NOTIFY_SOCKET every call returns False and nothing is sent or raised."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier.from_env()
    assert not n.enabled
    assert not n.ready() and not n.status("x") and not n.watchdog() and not n.stopping()
    assert n.watchdog_interval_s() is None


def test_notify_send_error_is_logged_once_and_never_raised(tmp_path, monkeypatch, caplog):
    """A socket that is gone makes sends return False and log one warning, not an exception."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    n = Notifier.from_env()
    with caplog.at_level(logging.WARNING, logger="trainerd.sdnotify"):
        assert n.ready() is False
        assert n.watchdog() is False
        assert n.status("still fine") is False
    assert len([r for r in caplog.records if "sd_notify_failed" in r.getMessage()]) == 1


def test_notify_reconnects_after_the_socket_comes_back(tmp_path, monkeypatch):
    """After a failed send the next one reconnects (systemd re-executed, socket re-created)."""
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    n = Notifier.from_env()
    assert n.watchdog() is False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2.0)
    try:
        assert n.watchdog() is True
        assert _recv(sock) == {"WATCHDOG": "1"}
    finally:
        sock.close()


def test_watchdog_interval_honours_watchdog_pid():
    """WATCHDOG_USEC counts only when WATCHDOG_PID is unset or names this very process."""
    env = {"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_env(env).watchdog_interval_s() == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 30.0
    assert Notifier.from_env({**env, "WATCHDOG_PID": "1"}).watchdog_interval_s() is None
    assert Notifier.from_env({"NOTIFY_SOCKET": "/x"}).watchdog_interval_s() is None
    assert Notifier.from_env({**env, "WATCHDOG_USEC": "junk"}).watchdog_interval_s() is None


def test_unset_environment_hides_the_socket_from_children(notify_socket, monkeypatch):
    """from_env(unset_environment=True) removes NOTIFY_SOCKET/WATCHDOG_* so a worker cannot inherit them."""
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_env(unset_environment=True)
    assert not {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"} & set(os.environ)
    assert n.watchdog_interval_s() == 1.0
    assert n.watchdog()
    assert _recv(notify_socket) == {"WATCHDOG": "1"}


# --- the unit files ---------------------------------------------------------------------------


def _unit_keys(text: str) -> dict[str, list[str]]:
    keys: dict[str, list[str]] = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z]+)=(.*)$", line)
        if m:
            keys.setdefault(m.group(1), []).append(m.group(2))
    return keys


def test_unit_has_the_required_settings():
    """The unit is Type=notify with watchdog, restart, mixed kill, OOM policy, state dir = working dir."""
    k = _unit_keys(UNIT.read_text())
    want = {"Type": "notify", "NotifyAccess": "main", "Restart": "on-failure", "KillMode": "mixed",
            "OOMPolicy": "continue", "StateDirectory": "trainerd", "WorkingDirectory": "/var/lib/trainerd",
            "User": "trainerd", "ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateNetwork": "yes",
            "PrivateDevices": "yes"}
    for key, value in want.items():
        assert k.get(key) == [value], key
    assert "WatchdogSec" in k and "MemoryMax" in k
    assert "MemoryHigh" in UNIT.read_text()  # shown, with guidance
    assert k["ExecStart"][0].endswith("run --config /etc/trainerd/trainerd.yaml")


def test_timeout_stop_is_longer_than_the_stop_grace():
    """TimeoutStopSec exceeds the default supervisor.stop_grace_s, so a checkpoint is never SIGKILLed."""
    from trainerd.core.settings import Settings

    timeout = _unit_keys(UNIT.read_text())["TimeoutStopSec"][0]
    assert timeout.endswith("s")
    assert float(timeout[:-1]) >= Settings().supervisor.stop_grace_s + 20


def _installed(tmp_path: Path, *extra: str) -> Path:
    prefix = tmp_path / "prefix"
    r = subprocess.run([sys.executable, str(INSTALL), "--prefix", str(prefix), "--venv",
                        str(Path(sys.executable).parent.parent), *extra],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return prefix


@needs_analyze
def test_installed_unit_verifies_with_empty_stderr(tmp_path):
    """systemd-analyze verify on the installed unit and both drop-ins prints nothing at all."""
    prefix = _installed(tmp_path, "--gpu", "--multinode", "--serving-hook")
    unit = prefix / "etc/systemd/system/trainerd.service"
    assert (unit.parent / "trainerd.service.d" / "gpu.conf").exists()
    r = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    # verify exits 0 on unknown keys and bad values, only warning on stderr: stderr is the test.
    assert r.stderr == "" and r.returncode == 0, r.stderr


@needs_analyze
def test_repo_unit_verifies_except_for_the_placeholder_path(tmp_path):
    """The unit as shipped has no problem but its not-yet-installed ExecStart binary."""
    r = subprocess.run([ANALYZE, "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert all("/opt/trainerd/venv/bin/trainerd is not executable" in l for l in lines), r.stderr


@needs_analyze
def test_the_check_units_verify(tmp_path):
    """trainerd-check.service and .timer (docs/cli.md) verify with no problem but the not-yet-installed
    ExecStart binary; an instance of trainerd-alert@.service, its OnFailure= target, with none at all."""
    for name in ("trainerd-check.service", "trainerd-check.timer"):
        shutil.copy(REPO / "systemd" / name, tmp_path / name)
    shutil.copy(REPO / "systemd" / "trainerd-alert@.service", tmp_path / "trainerd-alert@trainerd-check.service.service")
    r = subprocess.run([ANALYZE, "verify", str(tmp_path / "trainerd-check.service"), str(tmp_path / "trainerd-check.timer")],
                       capture_output=True, text=True, timeout=60)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines and all("/opt/trainerd/venv/bin/trainerd is not executable" in ln for ln in lines), r.stderr
    r = subprocess.run([ANALYZE, "verify", str(tmp_path / "trainerd-alert@trainerd-check.service.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.stderr == "" and r.returncode == 0, r.stderr


def _exposure(unit: Path) -> float:
    r = subprocess.run([ANALYZE, "security", "--offline=true", str(unit)], capture_output=True,
                       text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout[-2000:] + r.stderr
    return float(m.group(1))


@needs_analyze
def test_security_exposure_is_at_most_2():
    """`systemd-analyze security --offline=true systemd/trainerd.service` scores 2.0 or less."""
    score = _exposure(UNIT)
    print(f"exposure {score}")
    assert score <= 2.0


@needs_analyze
@pytest.mark.parametrize("dropin", ["gpu.conf", "multinode.conf", "ranks.conf", "serving-hook.conf"])
def test_security_exposure_with_each_dropin_stays_at_most_2(tmp_path, dropin):
    """Opening GPUs or the network through a drop-in still keeps the exposure at 2.0 or less."""
    d = tmp_path / "trainerd.service.d"
    d.mkdir()
    shutil.copy(UNIT, tmp_path / "trainerd.service")
    shutil.copy(REPO / "systemd" / dropin, d / dropin)
    base, opened = _exposure(UNIT), _exposure(tmp_path / "trainerd.service")
    print(f"{dropin}: exposure {base} -> {opened}")
    assert opened <= 2.0


# --- the installer ----------------------------------------------------------------------------


def test_install_service_into_a_prefix_is_idempotent(tmp_path):
    """A second run changes nothing, keeps the operator's config, and drops a drop-in no longer asked for."""
    prefix = _installed(tmp_path, "--gpu")
    unit = prefix / "etc/systemd/system/trainerd.service"
    cfg = prefix / "etc/trainerd/trainerd.yaml"
    text = unit.read_text()
    venv = Path(sys.executable).parent.parent
    k = _unit_keys(text)
    assert k["ExecStart"][0].startswith(str(venv / "bin"))
    assert k["ExecStart"][0].endswith("run --config /etc/trainerd/trainerd.yaml")
    assert "root: /var/lib/trainerd" in cfg.read_text()
    cfg.write_text(cfg.read_text() + "supervisor:\n  stop_grace_s: 100\n")
    r = subprocess.run([sys.executable, str(INSTALL), "--prefix", str(prefix), "--venv", str(venv)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "stop_grace_s: 100" in cfg.read_text()  # never overwritten
    assert _unit_keys(unit.read_text())["TimeoutStopSec"] == ["130s"]  # sized from the config
    assert not (unit.parent / "trainerd.service.d" / "gpu.conf").exists()
    r2 = subprocess.run([sys.executable, str(INSTALL), "--prefix", str(prefix), "--venv", str(venv)],
                        capture_output=True, text=True, timeout=120)
    assert "write" not in r2.stdout and "update" not in r2.stdout, r2.stdout


def test_install_service_dry_run_writes_nothing(tmp_path):
    """--dry-run prints the unit it would write and leaves the prefix empty."""
    prefix = tmp_path / "prefix"
    r = subprocess.run([sys.executable, str(INSTALL), "--prefix", str(prefix), "--dry-run",
                        "--venv", str(Path(sys.executable).parent.parent)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Type=notify" in r.stdout and "[dry-run] write" in r.stdout
    assert not prefix.exists()
