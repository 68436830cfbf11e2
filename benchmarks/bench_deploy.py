"""Deployment of an image tar: ``load_inference`` against ``docker load`` + ``docker run`` by hand.

The image is the example classifier plus a layer of ``--layer-mb`` MB of random bytes (a
model file), so each load really unpacks that layer; the layers below it are shared with
the images ``make images`` built, as on a board that already has the runtime image. Both
start from the same engine state: the image absent (removing its only tag removes its own
layer) and no container. By hand: ``docker load -i TAR`` then ``docker run -d --network host --init``
with the same image and environment; the time ends when ``docker run`` returns (the
container has started). Ours: ``load_inference`` with ``image_path``/``image_filename``;
the time ends when it returns, which is later in the container's life: its Connector has
connected to the manager and the inference can take requests. Rounds alternate the two.

    python benchmarks/bench_deploy.py [--rounds N] [--tar PATH] [--json PATH]
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import docker

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import ManagerProcess, SSHBoards  # noqa: E402

from infinibrain import ContainerConfig  # noqa: E402

TAG = "ib-bench/classifier:deploy"


def untag(client: docker.DockerClient) -> None:
    try:
        client.images.remove(TAG)
    except docker.errors.ImageNotFound:
        pass


def make_image(client: docker.DockerClient, layer_mb: int) -> None:
    """TAG: the example classifier with a model layer of ``layer_mb`` MB of random bytes."""
    dockerfile = b"FROM infinibrain/example-classifier:latest\nCOPY model.bin /opt/model.bin\n"
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as ctx:
        for name, data in (("Dockerfile", dockerfile), ("model.bin", os.urandom(layer_mb * 1_000_000))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            ctx.addfile(info, io.BytesIO(data))
    buf.seek(0)
    client.images.build(fileobj=buf, custom_context=True, tag=TAG, rm=True, network_mode="none")


HAND_NAME = "ib-bench-by-hand"


def run_args(env: list[str]) -> list[str]:
    return ["run", "-d", "--network", "host", "--init", "--name", HAND_NAME, *sum((["-e", e] for e in env), []), TAG]


def by_hand(tar: Path, env: list[str]) -> None:
    cli = shutil.which("docker")
    subprocess.run([cli, "load", "-q", "-i", str(tar)], check=True, stdout=subprocess.DEVNULL, timeout=600)
    subprocess.run([cli, *run_args(env)], check=True, stdout=subprocess.DEVNULL, timeout=120)


def by_hand_ssh(boards: SSHBoards, tar: Path, env: list[str]) -> None:
    """scp, then docker load and docker run over ssh, as an operator would."""
    b = boards.settings("b1")
    opts = ["-i", b["ssh_key"], "-o", f"UserKnownHostsFile={b['known_hosts']}", "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes"]
    target = f"{b['ssh_user']}@{b['address']}"
    remote = f"/tmp/{tar.name}"
    subprocess.run(["scp", "-q", *opts, "-P", str(b["ssh_port"]), str(tar), f"{target}:{remote}"], check=True, timeout=600)
    ssh = ["ssh", *opts, "-p", str(b["ssh_port"]), target]
    subprocess.run([*ssh, f"docker load -q -i {remote} && rm -f {remote}"], check=True, stdout=subprocess.DEVNULL, timeout=600)
    subprocess.run([*ssh, " ".join(["docker", *run_args(env)])], check=True, stdout=subprocess.DEVNULL, timeout=120)


def timed(call, client: docker.DockerClient) -> float:
    t0 = time.perf_counter()
    call()
    elapsed = time.perf_counter() - t0
    client.containers.get(HAND_NAME).remove(force=True)
    return elapsed


def ours(cluster, tar: Path, name: str, board: str) -> tuple[float, dict]:
    cfg = ContainerConfig(name=name, implementation_type="docker", input="Main", output="Main",
                          image_path=str(tar.parent), image_filename=tar.name, image_tag=TAG)
    t0 = time.perf_counter()
    handler = cluster.load_inference(cfg, board)
    elapsed = time.perf_counter() - t0
    cluster.unload_inference(name, delete_image=False)
    return elapsed, handler.deployment


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tar", type=Path, help="a docker save tar of TAG (default: made from infinibrain/example-classifier)")
    parser.add_argument("--layer-mb", type=int, default=64, help="size of the image's own model layer")
    parser.add_argument("--ssh", action="store_true", help="deploy to an emulated SSH board instead of the local engine")
    parser.add_argument("--json")
    args = parser.parse_args()
    client = docker.from_env(version="auto", timeout=600)
    tmp = Path(tempfile.mkdtemp(prefix="ib-deploy-"))
    tar = args.tar
    if tar is None:
        make_image(client, min(max(args.layer_mb, 0), 2048))
        tar = tmp / "classifier.tar"
        with open(tar, "wb") as fh:
            for chunk in client.images.get(TAG).save(named=True):
                fh.write(chunk)
    boards = None
    if args.ssh:
        boards = SSHBoards(tmp / "boards", 1)
        boards.start()
        manager = boards.manager(tmp / "m", boards=("b1",), log_level="WARNING").start()
        board, hand_way = "b1", lambda: by_hand_ssh(boards, tar, env)
    else:
        manager = ManagerProcess(tmp / "m", boards=("local",), log_level="WARNING").start()
        board, hand_way = "local", lambda: by_hand(tar, env)
    cluster = manager.client()
    env = ["INFINIBRAIN_HOST=127.0.0.1", f"INFINIBRAIN_PUB_PORT={manager.port + 4}", f"INFINIBRAIN_SUB_PORT={manager.port + 3}",
           "INFINIBRAIN_CONTAINER=by-hand"]
    hand, mine, steps = [], [], []
    try:
        for i in range(max(1, min(args.rounds, 50))):
            untag(client)
            hand.append(timed(hand_way, client))
            untag(client)
            elapsed, figures = ours(cluster, tar, f"deploy{i}", board)
            mine.append(elapsed)
            steps.append(figures)
            print(f"round {i + 1}: by hand {hand[-1]:.3f} s, load_inference {mine[-1]:.3f} s "
                  f"(sending {figures.get('transfer_seconds', 0):.3f} s, docker load {figures.get('load_seconds', 0):.3f} s)")
    finally:
        untag(client)
        cluster.release()
        manager.stop()
        manager.cleanup()
        if boards is not None:
            boards.stop()
    how = "scp + ssh docker load + ssh docker run" if args.ssh else "docker load + docker run"
    report = {
        "board": "ssh (emulated)" if args.ssh else "local",
        "tar_MB": tar.stat().st_size / 1e6,
        "by_hand_median_s": statistics.median(hand),
        "ours_median_s": statistics.median(mine),
        "ratio": statistics.median(mine) / statistics.median(hand),
        "by_hand_s": hand,
        "ours_s": mine,
        "ours_steps": steps,
    }
    print(f"tar {report['tar_MB']:.0f} MB: {how} {report['by_hand_median_s']:.3f} s, "
          f"load_inference {report['ours_median_s']:.3f} s (medians of {len(hand)}): x{report['ratio']:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
