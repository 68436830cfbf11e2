"""The status page in a real headless browser (Debian's chromium), and the Grafana
dashboard's expressions against the metrics a real manager serves (issue 27)."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from conftest import ROOT, connected, echo_config, running_manager, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# As the machine's notes say a headless Chromium must start here: no sandbox (root), no
# GPU, and none of its background connections (this machine reaches nothing else).
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def browser(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *args],
                          capture_output=True, text=True, timeout=90)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it: scripts/prereqs.sh)")
def test_the_status_page_in_a_headless_browser(jetson_path, tmp_path, name):
    with running_manager(tmp_path / "m", boards=("local", "b2"), telemetry_interval_ms=300) as m, connected(m) as c:
        c.load_inference(echo_config(name), "local")
        for _ in range(3):
            c.infer(name, b"x")
        with pytest.raises(Exception):
            c.infer(name + "-missing", b"x")
        wait_for(lambda: all(b["state"] == "ok" for b in c.get_board_telemetry()["boards"].values()))
        url = f"http://127.0.0.1:{m.port + 5}/"
        dom = browser(tmp_path, "--dump-dom", url).stdout
        boards = re.search(r"<table id=\"boards\">(.*?)</table>", dom, re.S)
        assert boards and ">local<" in boards[1] and ">b2<" in boards[1] and "7.7 W" in boards[1]  # the Jetson-like board's power
        containers = re.search(r"<table id=\"containers\">(.*?)</table>", dom, re.S)
        assert containers and f">{name}-local<" in containers[1] and ">ready<" in containers[1]
        inferences = re.search(r"<table id=\"inferences\">(.*?)</table>", dom, re.S)
        assert inferences and f">{name}<" in inferences[1]
        recent = re.search(r"<table id=\"recent\">(.*?)</table>", dom, re.S)
        assert recent and ">400<" in recent[1]  # the request for an inference that does not exist
        shot = tmp_path / "status.png"
        browser(tmp_path, f"--screenshot={shot}", "--window-size=1280,900", url)
        assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
        c.unload_inference(name)


def test_every_grafana_expression_names_a_metric_the_manager_serves(jetson_path, tmp_path, name):
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    assert len(dashboard["panels"]) >= 10 and all(p["datasource"]["type"] == "prometheus" for p in dashboard["panels"])
    with running_manager(tmp_path / "m", boards=("local",), telemetry_interval_ms=300) as m, connected(m) as c:
        c.load_inference(echo_config(name), "local")
        for _ in range(5):
            c.infer(name, b"x", {"sleep": 0.05})
        wait_for(lambda: c.get_board_telemetry()["energy"])
        served = urllib.request.urlopen(f"http://127.0.0.1:{m.port + 5}/metrics", timeout=10).read().decode()
        names = {line.split("{")[0].split()[0] for line in served.splitlines() if line and not line.startswith("#")}
        for expr in exprs:
            for metric in re.findall(r"\binfinibrain_[a-z0-9_]+", expr):
                assert metric in names, f"{metric} (in {expr!r}) is not among the metrics the manager serves"
        c.unload_inference(name)
