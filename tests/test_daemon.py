"""The daemon's command line: the embedded default, signals, a bad configuration."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import wait_for
from infinibrain import AICluster
from infinibrain.errors import InfinibrainException


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def test_embedded_default_serves_aicluster_without_arguments(tmp_path):
    if not all(port_free(5570 + i) for i in range(5)):
        pytest.skip("ports 5570-5574 are in use on this machine (another manager runs?)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "infinibrain.manager"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def up():
            try:
                AICluster(timeout=0.5).release()
                return True
            except InfinibrainException:
                return False

        wait_for(up, timeout=20)
        cluster = AICluster()
        boards = cluster.get_coprocessor_handler()
        assert [(b.name, b.ip) for b in boards] == [("local", "127.0.0.1")]
        cluster.release()
        assert (tmp_path / "state" / "infinibrain" / "inferences").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C stops it cleanly too
        out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "received SIGINT" in out and "manager stopped" in out


def test_bad_configuration_stops_the_start_with_the_key(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[manager]\nport = 7000\nqueue_size = 3\n[[coprocessor]]\nname = 'a'\n")
    proc = subprocess.run([sys.executable, "-m", "infinibrain.manager", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and "'queue_size'" in proc.stderr
    missing = subprocess.run([sys.executable, "-m", "infinibrain.manager", "--config", str(tmp_path / "none.toml")],
                             capture_output=True, text=True, timeout=30)
    assert missing.returncode == 2 and "cannot read config file" in missing.stderr


def test_a_busy_port_is_a_clear_error(manager, tmp_path):
    cfg = tmp_path / "same-port.toml"
    cfg.write_text(f"[manager]\nport = {manager.port}\nstate_dir = '{tmp_path}/s'\n[[coprocessor]]\nname = 'a'\n")
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "infinibrain.manager", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and f"cannot bind 127.0.0.1:{manager.port}" in proc.stderr
    assert time.monotonic() - started < 20


def test_json_log_lines(fresh_manager, name):
    import json

    from conftest import connected, echo_config

    m = fresh_manager(log_format="json", log_level="INFO").start()
    with connected(m) as c:
        c.load_inference(echo_config(name), "local")
        c.unload_inference(name)
    m.stop()
    entries = [json.loads(line) for line in m.log().splitlines() if line.strip()]
    assert {"time", "level", "logger", "message"} <= set(entries[0])
    assert any(e["logger"] == "infinibrain.manager.runtimes.process" and e["message"].startswith(f"started {name}-local") for e in entries)
    assert entries[-1]["message"] == "manager stopped"


def test_systemd_unit_runs_the_installed_manager():
    import configparser

    from conftest import ROOT

    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # systemd keys are case-sensitive
    unit.read(ROOT / "systemd" / "infinibrain-manager.service")
    program, *args = unit["Service"]["ExecStart"].split()
    assert program.endswith("/bin/infinibrain-manager") and args[0] == "--config"
    assert 'infinibrain-manager = "infinibrain.manager.daemon:main"' in (ROOT / "pyproject.toml").read_text()
    assert unit["Service"]["KillSignal"] == "SIGTERM" and unit["Service"]["StateDirectoryMode"] == "0700"
