"""``infinibrain-manager init``: a secure configuration in one step.

    infinibrain-manager init --boards-network 10.0.0.1 [--ssh-board jetson1=infinibrain@10.0.0.11 ...]

writes a configuration with CURVE on, applications' ports on 127.0.0.1 and the
containers' ports on the boards' network, and makes the keys: the manager's pair, the
pair its containers get, and a pair for applications of this user on this host (found by
AICluster without any setting, docs/OPERATIONS.md). Other applications' public keys go in
the ``clients`` folder it names.

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
    p.add_argument("--boards-network", required=True, metavar="ADDRESS",
                   help="this host's address on the boards' network: the containers' ports listen there only")
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
        if args.config.exists() and not args.force:
            raise ConfigError(f"{args.config} exists: give --force to overwrite it, or --config for another file")
        if not security.curve_available():
            raise ConfigError("this pyzmq/libzmq has no CURVE support")
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(state, 0o700)
        (state / "clients").mkdir(exist_ok=True)
        text = configuration(args)
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
    atomic_write(args.config, text)
    print(f"wrote {args.config}: CURVE on; applications' ports on 127.0.0.1:{args.port}-{args.port + 2}, "
          f"containers' ports on {args.boards_network}:{args.port + 3}-{args.port + 4}")
    print(f"manager public key: {manager_public} ({security.load_public(str(manager_public)).decode()})")
    print(f"applications of {getpass.getuser()} on this host use {client_secret} by themselves;")
    print(f"  other applications: infinibrain-keygen DIR NAME, put DIR/NAME.key in {state / 'clients'}, and run them with")
    print(f"  INFINIBRAIN_CURVE_SERVER_KEY={manager_public} INFINIBRAIN_CURVE_CLIENT_KEY=DIR/NAME.key_secret")
    print(f"start it: infinibrain-manager --config {args.config}")
    return 0


def configuration(args: argparse.Namespace) -> str:
    """The configuration file's text, checked by the manager's own parser."""
    try:
        ipaddress.ip_address(args.boards_network)
    except ValueError:
        raise ConfigError(f"--boards-network must be an IP address, got {args.boards_network!r}") from None
    if args.boards_network in ("0.0.0.0", "::"):
        raise ConfigError("--boards-network must be one address of this host, not every address")
    state = str(Path(args.state_dir).expanduser().resolve())
    manager = {
        "host": "127.0.0.1",
        "board_host": args.boards_network,
        "port": args.port,
        "state_dir": state,
        "curve": True,
        "curve_client_keys": str(Path(state) / "clients"),
    }
    lines = ["# Written by `infinibrain-manager init` (docs/DEPLOYMENT.md). Applications connect on",
             "# 127.0.0.1; containers on board_host, with the keys the manager gives them.", "[manager]"]
    lines += [f"{key} = {toml_value(value)}" for key, value in manager.items()]
    boards: list[dict] = [] if args.no_local else [{"name": "local"}]
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
