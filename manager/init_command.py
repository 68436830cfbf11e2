"""``infinibrain-manager init``: a secure configuration in one step.

    infinibrain-manager init --boards-network 10.0.0.1 [--ssh-board jetson1=infinibrain@10.0.0.11 ...]
    infinibrain-manager init --group 10.0.0.1,10.0.0.2 --etcd http://10.0.0.1:2379,... [--ssh-board ...]

writes a configuration with CURVE on, applications' ports on 127.0.0.1 and the
containers' ports on the boards' network, and makes the keys: the manager's pair, the
pair its containers get, and a pair for applications of this user on this host (found by
AICluster without any setting, docs/OPERATIONS.md). Other applications' public keys go in
the ``clients`` folder it names.

With ``--group``, one configuration per manager of a group (manager/group.py), each
beside ``--config`` named after its address: the same etcd, boards and keys (one server
key for the group: copy state_dir/keys to every member), each manager facing
applications and boards on its own address.

The command's main thread.
"""
from __future__ import annotations

import argparse
import getpass
import ipaddress
import json
import os
import re
import sys
from pathlib import Path

from infinibrain import security

from . import keygen
from .config import ConfigError, parse_config_text
from .store import atomic_write

BOARD_RE = re.compile(r"^(?P<name>[^=]+)=(?:(?P<user>[^@]+)@)?(?P<address>[^:@]+)(?::(?P<port>\d+))?$")


def default_config_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "infinibrain" / "manager.toml"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="infinibrain-manager init", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boards-network", metavar="ADDRESS",
                   help="this host's address on the boards' network: the containers' ports listen there only")
    p.add_argument("--group", metavar="ADDRESS,ADDRESS,...",
                   help="a manager group: every manager's address (applications and boards reach each there)")
    p.add_argument("--etcd", metavar="URL,URL,...", help="a group's etcd client URLs (with --group)")
    p.add_argument("--etcd-prefix", default="/infinibrain", help="a group's keys in etcd (default: %(default)s)")
    p.add_argument("--config", type=Path, default=default_config_path(), help="the file to write (default: %(default)s)")
    p.add_argument("--state-dir", default=security.default_state_dir(), help="registrations and keys (default: %(default)s)")
    p.add_argument("--port", type=int, default=5570, help="base port (default: %(default)s)")
    p.add_argument("--ssh-board", action="append", default=[], metavar="NAME=[USER@]ADDRESS[:PORT]",
                   help="a coprocessor board reached over SSH (repeat for each)")
    p.add_argument("--ssh-key", default="", help="private key for the SSH boards (default: the SSH agent)")
    p.add_argument("--known-hosts", default="", help="the SSH boards' host keys (default: ~/.ssh/known_hosts)")
    p.add_argument("--no-local", action="store_true", help="no board named 'local' on this host")
    p.add_argument("--client", action="append", default=[], metavar="NAME[:infer]",
                   help="also make a key pair for another application, allowed to manage (or, with :infer, to run "
                        "inference only); its files go in state_dir/keys (repeat for each)")
    p.add_argument("--force", action="store_true", help="overwrite an existing configuration file")
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    state = Path(args.state_dir).expanduser().resolve()
    try:
        if not security.curve_available():
            raise ConfigError("this pyzmq/libzmq has no CURVE support")
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state, 0o700)
        (state / "clients").mkdir(exist_ok=True)
        members = group_members(args)
        texts = {path: configuration(args, host) for path, host in members} if members else {args.config: configuration(args)}
        existing = [str(path) for path in texts if path.exists()]
        if existing and not args.force:
            raise ConfigError(f"{existing[0]} exists: give --force to overwrite it, or --config for another file")
    except (ConfigError, OSError) as exc:
        print(f"infinibrain-manager init: {exc}", file=sys.stderr)
        return 2
    keys = state / "keys"
    manager_public, _ = security.generate(keys, "manager")
    _, client_secret = security.generate(keys, "client")
    for spec in args.client:
        who, _, role = spec.partition(":")
        public_file, secret_file = security.generate(keys, who)
        where = keygen.allow(public_file, str(state / "clients"), "infer" if role == "infer" else "manage")
        print(f"application {who}: {secret_file} ({'inference only' if role == 'infer' else 'manages'}; allowed in {where.parent})")
    args.config.parent.mkdir(parents=True, exist_ok=True)
    for path, text in texts.items():
        atomic_write(path, text)
    if members:
        print(f"wrote {', '.join(str(p) for p in texts)}: a manager group on etcd {args.etcd}, CURVE on, each manager on "
              f"its address, ports {args.port}-{args.port + 4}; copy {keys} to every member's state_dir and start "
              f"each with its file; applications use AICluster(host_ip=\"{args.group}\", port={args.port})")
    else:
        print(f"wrote {args.config}: CURVE on; applications' ports on 127.0.0.1:{args.port}-{args.port + 2}, "
              f"containers' ports on {args.boards_network}:{args.port + 3}-{args.port + 4}")
    print(f"manager public key: {manager_public} ({security.load_public(str(manager_public)).decode()})")
    print(f"applications of {getpass.getuser()} on this host use {client_secret} by themselves;")
    print(f"  other applications: infinibrain-keygen DIR NAME, put DIR/NAME.key in {state / 'clients'}, and run them with")
    print(f"  INFINIBRAIN_CURVE_SERVER_KEY={manager_public} INFINIBRAIN_CURVE_CLIENT_KEY=DIR/NAME.key_secret")
    print(f"start it: infinibrain-manager --config {args.config}")
    return 0


def group_members(args: argparse.Namespace) -> list[tuple[Path, str]]:
    """(its configuration file, its address) of each manager of ``--group``; [] without it."""
    if not args.group:
        if not args.boards_network:
            raise ConfigError("give --boards-network (one manager) or --group with --etcd (a manager group)")
        return []
    if not args.etcd:
        raise ConfigError("--group needs --etcd: the etcd client URLs the group keeps its state in")
    hosts = [h.strip() for h in args.group.split(",") if h.strip()]
    for h in hosts:
        _one_address(h, "--group")
    return [(args.config.with_name(f"{args.config.stem}-{h}{args.config.suffix or '.toml'}"), h) for h in hosts]


def _one_address(value: str, option: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{option} must be IP addresses, got {value!r}") from None
    if value in ("0.0.0.0", "::"):
        raise ConfigError(f"{option} must name addresses of hosts, not every address")


def configuration(args: argparse.Namespace, member: str | None = None) -> str:
    """The configuration file's text (of the group's ``member`` with --group), checked by
    the manager's own parser."""
    state = str(Path(args.state_dir).expanduser().resolve())
    if member is None:
        _one_address(args.boards_network, "--boards-network")
        manager: dict = {"host": "127.0.0.1", "board_host": args.boards_network}
        head = ["# Written by `infinibrain-manager init` (docs/DEPLOYMENT.md). Applications connect on",
                "# 127.0.0.1; containers on board_host, with the keys the manager gives them."]
    else:
        manager = {"host": member, "board_host": member, "etcd": args.etcd, "etcd_prefix": args.etcd_prefix,
                   "group_hosts": args.group}
        head = ["# Written by `infinibrain-manager init --group` (docs/OPERATIONS.md, \"A manager group\"): the",
                f"# manager on {member}; applications and containers reach the group's leader on {args.group}."]
    manager.update({"port": args.port, "state_dir": state, "curve": True, "curve_client_keys": str(Path(state) / "clients")})
    lines = head + ["[manager]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in manager.items()]
    # A group's managers run on several machines: "local" would be a different board for each.
    one_machine = member is None or all(security.is_loopback(h) for h in args.group.split(","))
    boards: list[dict] = [] if args.no_local or not one_machine else [{"name": "local"}]
    for spec in args.ssh_board:
        boards.append(_ssh_board(spec, args))
    if not boards:
        raise ConfigError("no boards: give --ssh-board, or leave out --no-local")
    for board in boards:
        lines += ["", "[[coprocessor]]"] + [f"{key} = {toml_value(value)}" for key, value in board.items()]
    text = "\n".join(lines) + "\n"
    _check(text)
    return text


def _ssh_board(spec: str, args: argparse.Namespace) -> dict:
    match = BOARD_RE.match(spec)
    if not match:
        raise ConfigError(f"--ssh-board must be NAME=[USER@]ADDRESS[:PORT], got {spec!r}")
    board = {"name": match["name"], "transport": "ssh", "address": match["address"],
             "ssh_port": int(match["port"] or 22), "ssh_user": match["user"] or getpass.getuser()}
    if args.ssh_key:
        board["ssh_key"] = str(Path(args.ssh_key).expanduser().resolve())
    if args.known_hosts:
        board["known_hosts"] = str(Path(args.known_hosts).expanduser().resolve())
    return board


def _check(text: str) -> None:
    """The manager's own checks, before anything is written."""
    try:
        parse_config_text(text)
    except ConfigError as exc:
        raise ConfigError(f"the configuration would not start: {exc}") from None


def toml_value(value: object) -> str:
    return json.dumps(value)  # strings, integers and booleans are written alike in JSON and TOML
