"""The `infinibrain` command, every subcommand, against a real manager (as subprocesses)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from pathlib import Path

import numpy as np
import pytest

from conftest import SCRIPTS, wait_for
from infinibrain.errors import exit_status


def ib(m, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", str(m.port), *args],
                          capture_output=True, text=True, timeout=timeout)


def ok(m, *args: str) -> str:
    out = ib(m, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def status_json(m) -> dict:
    return json.loads(ok(m, "status", "--json"))


def deployment(folder: Path, name: str, boards: object = "all", **settings: object) -> Path:
    """A deployment file whose script_path is relative to it (a copy of the test scripts)."""
    scripts = folder / "scripts"
    if not scripts.exists():
        scripts.mkdir(parents=True)
        for f in SCRIPTS.glob("*.py"):
            (scripts / f.name).write_text(f.read_text())
    lines = ["[[inference]]", f'name = "{name}"', 'implementation_type = "process"', 'input = "Main"', 'output = "Main"',
             'script_path = "scripts"', f"boards = {json.dumps(boards)}"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    lines += ["[inference.inference_modules]", 'sub_inference_name = "echo"', 'script = "echo.py"']
    path = folder / "deploy.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture
def cm(fresh_manager):
    return fresh_manager().start()


def test_status_deploy_apply_again_and_undeploy(cm, name, tmp_path):
    out = ok(cm, "status")
    assert "BOARD" in out and "local" in out and "b2" in out and "no inferences deployed" in out
    path = deployment(tmp_path, name)
    out = ok(cm, "deploy", str(path), "--quiet")
    assert f"{name}: created on b2, local" in out
    table = ok(cm, "status")
    assert f"{name}-local" in table and "connected" in table and "INFLIGHT" not in table and "IN_FLIGHT" in table
    rows = status_json(cm)["containers"]
    assert {(r["board"], r["connect"], r["distribution"]) for r in rows} == {("local", "connected", "on"), ("b2", "connected", "on")}
    # Applying the same file changes nothing: the containers keep running, same processes.
    with cm.client() as c:
        pids = {c.infer(name, b"x")[0]["pid"] for _ in range(6)}
        assert ok(cm, "deploy", str(path), "--quiet").strip() == f"{name}: unchanged on b2, local"
        assert {c.infer(name, b"x")[0]["pid"] for _ in range(6)} == pids
    # Fewer boards: only the removed one goes.
    deployment(tmp_path, name, boards=["local"])
    assert "removed from b2" in ok(cm, "deploy", str(path), "--quiet")
    assert [r["board"] for r in status_json(cm)["containers"]] == ["local"]
    # Other settings: the inference is replaced.
    deployment(tmp_path, name, boards=["local"], max_send_num=3)
    assert f"{name}: updated on local" in ok(cm, "deploy", str(path), "--quiet")
    with cm.client() as c:
        assert c.get_container_handler(name)[0].max_send_num == 3
    assert "removed" in ok(cm, "undeploy", name)
    assert status_json(cm)["containers"] == []


def test_bad_deployment_files_name_what_is_wrong(cm, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[inference]]\nname = 'x'\nboards = 'all'\nimplementation_typ = 'process'\n")
    out = ib(cm, "deploy", str(bad))
    assert out.returncode == exit_status(302) and "implementation_typ" in out.stderr and "what to do" in out.stderr
    bad.write_text("[[inference]\n")
    out = ib(cm, "deploy", str(bad))
    assert out.returncode == exit_status(200) and "not valid TOML" in out.stderr
    out = ib(cm, "deploy", str(tmp_path / "missing.toml"))
    assert out.returncode == exit_status(301)


def test_start_stop_logs_and_follow(cm, name, tmp_path):
    ok(cm, "deploy", str(deployment(tmp_path, name, boards=["local"])), "--quiet")
    assert "echo ready" in ok(cm, "logs", name)
    followed_path, err_path = tmp_path / "follow.out", tmp_path / "follow.err"
    with open(followed_path, "w") as out_file, open(err_path, "w") as err_file:
        follower = subprocess.Popen([sys.executable, "-m", "infinibrain.cli", "--port", str(cm.port), "logs", name, "--follow-seconds", "12"],
                                    stdout=out_file, stderr=err_file, text=True)
    try:
        # It follows: it has printed the log so far (and keeps reading it once a second).
        wait_for(lambda: "echo ready" in followed_path.read_text(), timeout=30)
        out = ok(cm, "stop", name)
        assert f"{name}-local: stopped" in out
        assert status_json(cm)["containers"][0]["status"] == "stopped"
        out = ok(cm, "start", name)
        assert f"{name}-local: running, connected" in out
        follower.wait(timeout=30)
        followed, err = followed_path.read_text(), err_path.read_text()
    finally:
        follower.kill()
    assert follower.returncode == 0, err
    assert followed.count("--- start") == 2 and followed.count("echo ready") == 2  # the restart showed up live
    ok(cm, "undeploy", name)


def test_queue_and_queue_delete(cm, name, tmp_path):
    ok(cm, "deploy", str(deployment(tmp_path, name, boards=["local"])), "--quiet")
    with cm.client() as c:
        c.get_container_handler(name)[0].stop_distribution()
        codes: list[int] = []
        for _ in range(3):
            c.infer_async(name, b"x", func=lambda code, *rest: codes.append(code))
        rows = wait_for(lambda: json.loads(ok(cm, "queue", name, "--json")) if len(json.loads(ok(cm, "queue", name, "--json"))) == 3 else None)
        assert {r["inference_name"] for r in rows} == {name}
        assert "REQUEST_NO" in ok(cm, "queue")
        # Another process's requests: refused without --force (308), deleted with it.
        assert "3 request(s) still waiting" in ok(cm, "queue", "delete", name)  # the command's own: none
        out = ib(cm, "queue", "delete", name, "--pid", str(os.getpid()))
        assert out.returncode == exit_status(308) and "--force" in out.stderr
        assert "0 request(s) still waiting" in ok(cm, "queue", "delete", name, "--force")
        wait_for(lambda: codes == [404, 404, 404])  # deleted: RequestDeletedException
        assert "no requests waiting" in ok(cm, "queue")
    ok(cm, "undeploy", name)


def test_put_infer_images_and_exit_codes(cm, name, tmp_path):
    ok(cm, "deploy", str(deployment(tmp_path, name, boards=["local"])), "--quiet")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    assert "labels.txt" in ok(cm, "put", str(labels), name, "--to", "etc")
    image = tmp_path / "image.npy"
    np.save(image, np.full((4, 5, 3), 2, np.uint8))
    answer = json.loads(ok(cm, "infer", name, str(image), "--param", json.dumps({"read": "etc/labels.txt"})))
    assert answer["result"]["shape"] == [4, 5, 3] and answer["result"]["sum"] == 120 and answer["result"]["read"] == "cat\ndog\n"
    assert answer["input"] == [4, 5, 3] and answer["latency_ms"] > 0
    ppm = tmp_path / "tiny.ppm"
    ppm.write_bytes(b"P6\n2 1\n255\n" + bytes([1, 2, 3, 4, 5, 6]))
    assert json.loads(ok(cm, "infer", name, str(ppm)))["result"]["shape"] == [1, 2, 3]
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"\x00" * 17)
    assert json.loads(ok(cm, "infer", name, str(raw)))["result"]["shape"] == [17]
    out = ok(cm, "images", "local")
    assert "local" in out and name in out  # the process container's files count as its image
    assert ib(cm, "images", "nosuch").returncode == exit_status(304)
    out = ib(cm, "infer", "nosuch", str(raw))
    assert out.returncode == exit_status(400) == 40 and "[400]" in out.stderr
    assert ib(cm, "undeploy", "nosuch").returncode == exit_status(300) == 30
    ok(cm, "undeploy", name)
    # No manager there: 110, with what to do.
    out = subprocess.run([sys.executable, "-m", "infinibrain.cli", "--port", "1", "--timeout", "1", "status"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == exit_status(110) == 12 and "infinibrain-manager" in out.stderr


def test_deploy_shows_image_load_progress(docker_kit, cm, name, tmp_path):
    """A Docker image loaded from a tar: the CLI shows a progress bar, and the async
    callback of load_inference gets the progress events."""
    client = docker_kit.client
    tag = f"ib-progress/{name}:{uuid.uuid4().hex[:6]}"
    client.images.get("infinibrain/runtime:latest").tag(*tag.split(":"))
    tar = tmp_path / "runtime.tar"
    with open(tar, "wb") as fh:
        for chunk in client.images.get(tag).save(named=True):
            fh.write(chunk)
    client.images.remove(tag)
    path = tmp_path / "docker.toml"
    path.write_text(f'[[inference]]\nname = "{name}"\nimplementation_type = "docker"\ninput = "Main"\noutput = "Main"\n'
                    f'image_tag = "{tag}"\nimage_path = "{tmp_path}"\nimage_filename = "runtime.tar"\nboards = ["local"]\n')
    out = ib(cm, "deploy", str(path))
    assert out.returncode == 0, out.stderr
    bars = [line for line in out.stderr.splitlines() if "loading runtime.tar" in line]
    assert bars and bars[-1].startswith("[" + "#" * 30 + "] 100%") and "local: loading runtime.tar" in bars[-1]
    assert any("local: ready" in line for line in out.stderr.splitlines())
    assert "loading runtime.tar  50%" in cm.log() or "loading runtime.tar  5" in cm.log()  # 10 % steps in the manager log
    ok(cm, "undeploy", name)  # deletes the image too

    # In Python: the progress callback gets the events; the reference's callback only the outcome.
    events: list[tuple] = []
    progress: list[dict] = []
    done = threading.Event()
    with cm.client() as c:
        def callback(code, message, cmd, result):
            events.append((code, cmd, result))
            done.set()

        from infinibrain import ContainerConfig

        c.set_progress_callback(lambda cmd, info: progress.append({"cmd": cmd, **info}))
        c.load_inference_async(ContainerConfig(name=name, implementation_type="docker", input="Main", output="Main", image_tag=tag,
                                               image_path=str(tmp_path), image_filename="runtime.tar"), "local", func=callback)
        assert done.wait(120)
        # The progress events come on their own path: the last one may follow the outcome.
        wait_for(lambda: any(p["stage"] == "ready" for p in progress))
        assert len(events) == 1 and events[0][:2] == (0, "load_inference")
        assert {p["cmd"] for p in progress} == {"load_inference"} and all(p["board"] == "local" for p in progress)
        loading = [p for p in progress if p["stage"] == "loading runtime.tar"]
        assert loading[-1]["done"] == loading[-1]["total"] == tar.stat().st_size
        assert [p["done"] for p in loading] == sorted(p["done"] for p in loading)
        assert [p["stage"] for p in progress if not p["stage"].startswith("loading")] == ["preparing", "starting", "ready"]
        c.unload_inference(name)
