"""Board telemetry (issue 27): a real manager sampling its boards through their links. A
Jetson cannot be had here: a board whose PATH holds a ``tegrastats`` that prints real
lines of NVIDIA's documentation (tests/scripts/tegrastats, tests/data/tegrastats.txt)
stands in for one; everything else is real (/proc, /sys, the sampler, sshd)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import connected, echo_config, mem_total, running_manager, wait_for
from infinibrain.manager.board_stats import Block, cpu_busy, parse_block, parse_tegrastats, sampler

DATA = Path(__file__).parent / "data"
ORIN, XAVIER = [line for line in (DATA / "tegrastats.txt").read_text().splitlines() if line and not line.startswith("#")]


def test_tegrastats_lines_of_orin_and_xavier_are_read():
    orin = parse_tegrastats(ORIN)
    assert (orin.gpu, orin.emc, orin.ram_used, orin.ram_total) == (0.0, 0.0, 2448 << 20, 62840 << 20)
    assert len(orin.cpu) == 12 and orin.temperatures["tj"] == 47.687 and "GPU" not in orin.temperatures  # -256C: off
    assert orin.rails["VDD_GPU_SOC"] == (3.176, 3.176) and orin.rails["VDDQ_VDD2_1V8AO"] == (0.402, 0.402)
    assert orin.board_watts == pytest.approx(3.176 + 0.794 + 3.36 + 0.402)  # AGX Orin has no input rail: the sum
    xavier = parse_tegrastats(XAVIER)
    assert xavier.cpu == [0.03, 0.02, 0.0, 0.01, None, None, None, None]  # "off" cores
    assert xavier.rails["SOC"] == (0.929, 0.929) and xavier.rails["SYS5V"] == (1.212, 1.212) and "EMC_FREQ" not in xavier.rails
    assert xavier.temperatures["Tdiode"] == 33.5 and xavier.emc == 0.0
    nano = parse_tegrastats("RAM 1216/3964MB (lfb 1x4MB) CPU [12%@1479,8%@1479,off,off] EMC_FREQ 3%@1600 GR3D_FREQ 61%@921 "
                            "POM_5V_IN 4212/3960 POM_5V_GPU 1090/950 POM_5V_CPU 760/700")
    assert nano.gpu == 0.61 and nano.board_watts == 4.212  # an input rail: its reading


def test_the_sampler_blocks_are_read_as_proc_says():
    first, second = _two_blocks()
    assert second.memory_total == mem_total()
    busy = cpu_busy(first, second)
    assert set(busy) == {"all", *map(str, range(os.cpu_count() or 1))} and all(0 <= v <= 1 for v in busy.values())
    assert parse_block(["load 0.50 0.40 0.30 1/100 5", "thermal x86_pkg_temp 45000", "thermal off -274000"]).temperatures == \
        {"x86_pkg_temp": 45.0}


def _two_blocks() -> tuple[Block, Block]:
    proc = subprocess.Popen(["sh", "-c", sampler(0.2)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    blocks, lines = [], None
    try:
        for line in proc.stdout:  # type: ignore[union-attr]
            line = line.rstrip("\n")
            if line == "@sample":
                lines = []
            elif line == "@end" and lines is not None:
                blocks.append(parse_block(lines))
                if len(blocks) == 2:
                    return blocks[0], blocks[1]
            elif lines is not None:
                lines.append(line)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(5)
    raise AssertionError("the sampler printed fewer than two blocks")


def test_a_local_board_and_a_jetson_like_one_in_the_call_the_metrics_and_status(jetson_path, tmp_path, name):
    with running_manager(tmp_path / "m", boards=("local",), telemetry_interval_ms=300) as m, connected(m) as c:
        t = wait_for(lambda: (b := c.get_board_telemetry()["boards"]["local"])["state"] == "ok" and b["cpu"] and b)
        total = mem_total()
        assert t["memory_total"] == total and 0 < t["memory_used"] < total
        assert set(t["cpu"]) == {"all", *map(str, range(os.cpu_count() or 1))}
        assert abs(t["load"][0] - float(Path("/proc/loadavg").read_text().split()[0])) < 2
        assert t["jetson"] and t["gpu"] == 0.0 and t["emc"] == 0.0 and t["temperatures"]["tegra_tj"] == 47.687
        assert t["rails"]["VDD_GPU_SOC"] == {"watts": 3.176, "average_watts": 3.176} and t["watts"] == pytest.approx(7.732)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{m.port + 5}/metrics", timeout=10).read().decode()
        for line in ('infinibrain_board_up{board="local"} 1.0', 'infinibrain_board_gpu_utilization_ratio{board="local"} 0.0',
                     'infinibrain_board_power_watts{board="local",rail="VDD_GPU_SOC"} 3.176',
                     'infinibrain_board_temperature_celsius{board="local",sensor="tegra_tj"} 47.687',
                     'infinibrain_board_cpu_utilization_ratio{board="local",cpu="all"}'):
            assert line in metrics, line
        out = subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", str(m.port), "status", "--json"],
                             capture_output=True, text=True, timeout=30)
        import json
        board = json.loads(out.stdout)["boards"][0]
        assert board["state"] == "ok" and board["telemetry"]["watts"] == pytest.approx(7.732)
        text = subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", str(m.port), "status"],
                              capture_output=True, text=True, timeout=30).stdout
        assert "BOARDS" in text and "7.7 W" in text

        # Energy per inference: the board's power over the time its container was busy.
        c.load_inference(echo_config(name), "local")
        for _ in range(10):
            c.infer(name, b"x", {"sleep": 0.1})
        energy = wait_for(lambda: [e for e in c.get_board_telemetry()["energy"] if e["inference"] == name and e["requests"] >= 10],
                          timeout=5)[0]
        assert 7.732 * 0.1 * 0.9 <= energy["joules_per_request"] <= 7.732 * 0.1 * 2  # about 0.77 J: 7.7 W for 0.1 s
        c.unload_inference(name)


def test_a_board_whose_sampler_stops_answering_shows_no_figures(tmp_path):
    with running_manager(tmp_path / "m", boards=("local",), telemetry_interval_ms=200) as m, connected(m) as c:
        wait_for(lambda: c.get_board_telemetry()["boards"]["local"]["state"] == "ok")
        sampler_pid = _sampler_of(m.proc.pid)
        os.killpg(sampler_pid, signal.SIGSTOP)  # it hangs: no EOF, just silence
        try:
            silent = wait_for(lambda: (b := c.get_board_telemetry()["boards"]["local"])["state"] == "silent" and b)
            assert silent["cpu"] == {} and silent["memory_total"] is None and "no sample" in silent["why"]
            metrics = urllib.request.urlopen(f"http://127.0.0.1:{m.port + 5}/metrics", timeout=10).read().decode()
            assert 'infinibrain_board_up{board="local"} 0.0' in metrics
            assert 'infinibrain_board_memory_total_bytes{board="local"}' not in metrics  # never stale figures
        finally:
            os.killpg(sampler_pid, signal.SIGCONT)
        wait_for(lambda: c.get_board_telemetry()["boards"]["local"]["state"] == "ok")  # it answers again


def _sampler_of(manager_pid: int) -> int:
    for child in Path(f"/proc/{manager_pid}/task").glob("*/children"):
        for pid in child.read_text().split():
            if "@sample" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace"):
                return int(pid)
    raise AssertionError("no sampler process under the manager")


def test_an_ssh_boards_telemetry_comes_over_its_one_connection_from_one_sampler(ssh_boards, tmp_path):
    name = "b1"
    m = ssh_boards.manager(tmp_path / "m", boards=(name,), telemetry_interval_ms=200).start()
    try:
        _ssh_telemetry(m, name)
    finally:
        m.stop()
        m.cleanup()


def _ssh_telemetry(m, name: str) -> None:
    with connected(m) as c:
        first = wait_for(lambda: (b := c.get_board_telemetry()["boards"][name])["state"] == "ok" and b["samples"] >= 2 and b,
                         timeout=20)
        time.sleep(1.0)
        later = c.get_board_telemetry()["boards"][name]
        assert later["samples"] >= first["samples"] + 3  # samples keep coming ...
        assert later["sampler_starts"] == 1  # ... from one long-lived command, not one per sample
        assert later["memory_total"] == mem_total()  # the board is this machine
