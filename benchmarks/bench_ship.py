"""Shipping an update to SSH boards: the main board's registry against whole tars over SFTP.

The image is 400 MB (the runtime and a 220 MB model layer); the update adds a 5 MB layer
on top. Four emulated SSH boards (scripts/boards.py, real sshd on 127.0.0.2-5), each with
a Docker engine of its own (its own layers, as a real board has). For each path the boards
start from nothing, get the first version (not measured), then the update is loaded on all
four at once (``load_inference(..., force_update=True)``) and measured: seconds, and bytes
sent to the boards (the ContainerHandlers' ``deployment.image_bytes``: the tar's size per
board over SFTP; what went through the boards' forwards from the registry).

    python benchmarks/bench_ship.py [--json PATH]

Needs root (the boards' engines), docker-registry and skopeo; every wait is bounded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import docker

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from conftest import SSHBoards, image_with_layer  # noqa: E402

from infinibrain import ContainerConfig  # noqa: E402

BOARDS = ("b1", "b2", "b3", "b4")
V1, V2 = "ib-bench/ship:1", "ib-bench/ship:2"


def wipe(boards_dir: Path) -> None:
    """Every board's engine empty again."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("boards", ROOT / "scripts" / "boards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    for name in BOARDS:
        sock = module.engine_socket(boards_dir.absolute(), name)
        subprocess.run(["docker", "-H", f"unix://{sock}", "system", "prune", "-af"], capture_output=True, timeout=300)


def config(name: str, tag: str, tar: Path, force: bool = False) -> ContainerConfig:
    return ContainerConfig(name=name, implementation_type="docker", input="Main", output="Main", image_tag=tag,
                           image_path=str(tar.parent), image_filename=tar.name, force_update=force)


def one_path(boards: SSHBoards, tmp: Path, transfer: str, tars: dict[str, Path]) -> dict:
    wipe(boards.dir)
    m = boards.manager(tmp / transfer, boards=BOARDS, overrides={b: {"image_transfer": transfer} for b in BOARDS},
                       log_level="WARNING", container_start_timeout_ms=120_000, engine_timeout_ms=600_000)
    m.start()
    try:
        with m.client(timeout=10) as c:
            c.load_inference(config("ship", V1, tars[V1]), list(BOARDS))  # the first version: not measured
            started = time.monotonic()
            handlers = c.load_inference(config("ship", V2, tars[V2], force=True), list(BOARDS))
            seconds = time.monotonic() - started
            sent = sum(h.deployment.get("image_bytes", 0) for h in handlers)
            assert c.infer("ship", b"x")[0]["bytes"] == 1
            c.unload_inference("ship")
    finally:
        m.stop()
        m.cleanup()
    row = {"path": transfer, "seconds": round(seconds, 2), "MB_sent": round(sent / 1e6, 1)}
    print(f"update to 4 boards over {transfer:8s}: {seconds:6.2f} s, {sent / 1e6:8.1f} MB sent to the boards", flush=True)
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json")
    args = ap.parse_args()
    client = docker.from_env(version="auto", timeout=600)
    out: dict = {}
    with tempfile.TemporaryDirectory(prefix="ib-bench-ship-") as folder:
        tmp = Path(folder)
        tars = {V1: image_with_layer(client, "infinibrain/runtime:latest", V1, tmp, 220, seed=1),
                V2: image_with_layer(client, V1, V2, tmp, 5, seed=2)}
        out["image_MB"] = round(tars[V2].stat().st_size / 1e6, 1)
        print(f"image {V2}: {out['image_MB']} MB tar, its top layer 5 MB", flush=True)
        boards = SSHBoards(tmp / "boards", len(BOARDS))
        boards._script("start", "--count", str(len(BOARDS)), "--own-engines", "--json")
        try:
            out["sftp"] = one_path(boards, tmp, "sftp", tars)
            out["registry"] = one_path(boards, tmp, "registry", tars)
        finally:
            wipe(boards.dir)
            boards.stop()
        for tag in (V2, V1):
            client.images.remove(tag, force=True)
    out["seconds_ratio"] = round(out["registry"]["seconds"] / out["sftp"]["seconds"], 3)
    out["bytes_ratio"] = round(out["registry"]["MB_sent"] / out["sftp"]["MB_sent"], 4)
    print(f"registry / sftp: time x{out['seconds_ratio']}, bytes x{out['bytes_ratio']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
