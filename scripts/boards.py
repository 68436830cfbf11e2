#!/usr/bin/env python3
"""Emulated SSH boards: one real OpenSSH server per board on its own loopback address.

    python3 scripts/boards.py start [--dir DIR] [--count 2] [--manager-port 5570]
    python3 scripts/boards.py stop  [--dir DIR] [--board b1]
    python3 scripts/boards.py start [--dir DIR] --board b1      # bring one back
    python3 scripts/boards.py install                           # only install openssh-server

``start`` installs Debian's openssh-server when sshd is missing (without letting apt start
the system's own sshd), generates a user key and one host key per board into DIR, starts
``sshd`` for board bN on 127.0.0.(N+1):2222 (key login only, for the current user), writes
DIR/known_hosts with the boards' host keys and DIR/cluster.toml: a manager configuration
listing the boards as ``transport = "ssh"``. The boards share this machine's Docker engine;
the manager tells their containers apart by labels. ``stop`` ends the servers it started,
by the pids in their pid files, with their open sessions. Prints the config path.
"""
from __future__ import annotations

import argparse
import getpass
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_DIR = Path(os.environ.get("INFINIBRAIN_BOARDS_DIR", "/tmp/infinibrain-boards"))
SSH_PORT = 2222
SSHD = "/usr/sbin/sshd"


def address(index: int) -> str:
    return f"127.0.0.{index + 1}"  # b1 -> 127.0.0.2, b2 -> 127.0.0.3, ...


def ensure_sshd() -> None:
    if os.path.exists(SSHD):
        return
    print("boards: installing openssh-server", file=sys.stderr)
    # A policy-rc.d that refuses keeps apt from starting the system sshd on 0.0.0.0:22.
    policy = Path("/usr/sbin/policy-rc.d")
    made = not policy.exists()
    if made:
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
    try:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        install = ["apt-get", "install", "-y", "-q", "openssh-server"]
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode != 0:  # stale package lists?
            subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdout=subprocess.DEVNULL)
            subprocess.run(install, check=True, env=env, stdout=subprocess.DEVNULL)
    finally:
        if made:
            policy.unlink()


def keygen(path: Path, comment: str) -> None:
    if not path.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)], check=True)


def engine_socket(root: Path, name: str) -> str:
    """Where a board with an engine of its own has it (a short path: unix socket paths are short)."""
    digest = hashlib.sha256(str(root).encode()).hexdigest()[:8]
    return f"/run/ib-boards-{digest}/{name}/docker.sock"


def start_engine(root: Path, name: str) -> None:
    """A Docker engine of the board's own (its own images and layers, as a real board has):
    the board's SSH sessions get DOCKER_HOST pointing at it (sshd_config SetEnv)."""
    sock = Path(engine_socket(root, name))
    sock.parent.mkdir(parents=True, exist_ok=True)
    folder = root / name
    pidfile = folder / "dockerd.pid"
    if pidfile.exists() and Path(f"/proc/{pidfile.read_text().strip()}").exists():
        return
    log = open(folder / "dockerd.log", "ab")
    subprocess.Popen(["dockerd", "--data-root", str(folder / "docker"), "--exec-root", str(sock.parent / "exec"),
                      "--host", f"unix://{sock}", "--pidfile", str(pidfile), "--bridge=none", "--iptables=false",
                      "--ip6tables=false"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if subprocess.run(["docker", "-H", f"unix://{sock}", "version"], capture_output=True).returncode == 0:
            return
        time.sleep(0.3)
    raise SystemExit(f"boards: the engine of {name} did not come up; see {folder / 'dockerd.log'}")


def stop_engine(root: Path, name: str) -> None:
    pidfile = root / name / "dockerd.pid"
    try:
        pid = int(pidfile.read_text().strip())
        with open(f"/proc/{pid}/comm") as fh:
            if fh.read().strip() == "dockerd":
                os.kill(pid, signal.SIGTERM)
                for _ in range(100):
                    if not Path(f"/proc/{pid}").exists():
                        break
                    time.sleep(0.1)
    except (OSError, ValueError):
        pass


def sshd_config(folder: Path, index: int, authorized: Path, docker_host: str = "") -> Path:
    cfg = folder / "sshd_config"
    cfg.write_text(
        "\n".join(
            [
                *([f"SetEnv DOCKER_HOST=unix://{docker_host}"] if docker_host else []),
                f"ListenAddress {address(index)}:{SSH_PORT}",
                f"HostKey {folder / 'ssh_host_ed25519_key'}",
                f"PidFile {folder / 'sshd.pid'}",
                f"AuthorizedKeysFile {authorized}",
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "UsePAM no",
                "StrictModes no",
                "X11Forwarding no",
                "AllowTcpForwarding remote",  # the reverse forward through which the board pulls images
                # The manager multiplexes many channels (engine calls, SFTP, commands) on one connection.
                "MaxSessions 64",
                "MaxStartups 64",
                "Subsystem sftp internal-sftp",
                "LogLevel INFO",
                "",
            ]
        )
    )
    return cfg


def _listening(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex((host, port)) == 0


def start_one(root: Path, index: int, own_engine: bool = False) -> int:
    name = f"b{index}"
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    keygen(folder / "ssh_host_ed25519_key", f"{name} host key")
    if own_engine:
        start_engine(root, name)
    if _pid(folder) is not None:
        return _pid(folder)  # type: ignore[return-value]
    cfg = sshd_config(folder, index, root / "authorized_keys", engine_socket(root, name) if own_engine else "")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation folder
    subprocess.run([SSHD, "-f", str(cfg), "-E", str(folder / "sshd.log")], check=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _pid(folder) is not None and _listening(address(index), SSH_PORT):
            return _pid(folder)  # type: ignore[return-value]
        time.sleep(0.05)
    raise SystemExit(f"boards: sshd for {name} did not come up; see {folder / 'sshd.log'}")


def _pid(folder: Path) -> int | None:
    """The pid in the board's pid file, if that process is still an sshd."""
    try:
        pid = int((folder / "sshd.pid").read_text().split()[0])
        with open(f"/proc/{pid}/comm") as fh:
            return pid if fh.read().strip().startswith("sshd") else None
    except (OSError, ValueError, IndexError):
        return None


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    text = fh.read()
            except OSError:
                continue
            if int(text[text.rfind(")") + 2 :].split()[1]) == pid:
                out.append(int(entry))
    return out


def stop_one(root: Path, name: str) -> bool:
    """End board ``name``'s sshd and the sessions it forked (a board that went down)."""
    folder = root / name
    pid = _pid(folder)
    if pid is None:
        return False
    tree, i = [pid], 0
    while i < len(tree):
        tree.extend(_children(tree[i]))
        i += 1
    for p in tree:
        try:
            with open(f"/proc/{p}/comm") as fh:
                if not fh.read().startswith("sshd"):
                    continue  # only sshd processes: what a session started is not ours to end
            os.kill(p, signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass
    (folder / "sshd.pid").unlink(missing_ok=True)
    return True


def write_config(root: Path, count: int, manager_port: int, python: str) -> Path:
    user = getpass.getuser()
    lines = [
        "# Written by scripts/boards.py: a manager on this machine with emulated SSH boards.",
        "[manager]",
        'host = "127.0.0.1"',
        f"port = {manager_port}",
        f'state_dir = "{root / "state"}"',
        "",
    ]
    for i in range(1, count + 1):
        lines += [
            "[[coprocessor]]",
            f'name = "b{i}"',
            'transport = "ssh"',
            f'address = "{address(i)}"',
            f"ssh_port = {SSH_PORT}",
            f'ssh_user = "{user}"',
            f'ssh_key = "{root / "id_ed25519"}"',
            f'known_hosts = "{root / "known_hosts"}"',
            'manager_address = "127.0.0.1"',
            f'python = "{python}"',
            f'work_dir = "{root / f"b{i}" / "work"}"',
            "",
        ]
    path = root / "cluster.toml"
    path.write_text("\n".join(lines))
    return path


def start(root: Path, count: int, manager_port: int, python: str, only: str | None, own_engines: bool = False) -> dict:
    ensure_sshd()
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    keygen(root / "id_ed25519", "infinibrain manager")
    shutil.copy(root / "id_ed25519.pub", root / "authorized_keys")
    indexes = [int(only.lstrip("b"))] if only else list(range(1, count + 1))
    pids = {f"b{i}": start_one(root, i, own_engines) for i in indexes}
    known = []
    for i in sorted({*indexes, *(int(p.name[1:]) for p in root.glob("b[0-9]*") if p.is_dir())}):
        kind, key, _ = (root / f"b{i}" / "ssh_host_ed25519_key.pub").read_text().split(" ", 2)
        known.append(f"[{address(i)}]:{SSH_PORT} {kind} {key}")
    (root / "known_hosts").write_text("\n".join(known) + "\n")
    config = root / "cluster.toml" if only else write_config(root, count, manager_port, python)
    return {"config": str(config), "dir": str(root), "pids": pids}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("start", "stop", "install"))
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--board", help="only this board (b1, b2, ...)")
    parser.add_argument("--manager-port", type=int, default=5570)
    parser.add_argument("--python", default=sys.executable, help="the boards' interpreter for process containers")
    parser.add_argument("--json", action="store_true", help="print what was started as JSON")
    parser.add_argument("--own-engines", action="store_true",
                        help="give each board a Docker engine of its own (its own layers, as a real board)")
    args = parser.parse_args()
    root = args.dir.absolute()
    if args.action == "install":
        ensure_sshd()
        return 0
    if args.action == "stop":
        names = [args.board] if args.board else sorted(p.name for p in root.glob("b[0-9]*") if p.is_dir())
        stopped = [n for n in names if stop_one(root, n)]
        for n in names:
            stop_engine(root, n)
        print(f"boards: stopped {', '.join(stopped) or 'nothing'}")
        return 0
    info = start(root, args.count, args.manager_port, args.python, args.board, args.own_engines)
    print(json.dumps(info) if args.json else f"boards: {', '.join(info['pids'])} up; config {info['config']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
