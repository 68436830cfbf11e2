"""The manager's configuration: one TOML file, or the embedded default.

Unknown keys and bad values are refused at start-up with a message naming the key, so a
typo never silently falls back to a default.

Pure: read once at start-up, then frozen (any thread may read it).
"""
from __future__ import annotations

import ipaddress
import os
import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from infinibrain import protocol as P
from infinibrain import security

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """The configuration file is unusable; the message names the key."""


@dataclass(frozen=True)
class BoardConfig:
    name: str
    transport: str = "local"  # "local" (this host) or "ssh"
    address: str = "127.0.0.1"  # the board's own address (reported as CoprocessorHandler.ip)
    manager_address: str = ""  # where this board's containers reach the manager; "" = [manager] board_host
    ssh_port: int = 22
    ssh_user: str = ""
    ssh_key: str = ""  # private key file; "" = the keys of the SSH agent ($SSH_AUTH_SOCK)
    known_hosts: str = ""  # host keys are checked against this file; "" = ~/.ssh/known_hosts
    accept_new_host_keys: bool = False  # opt-in: record an unknown board's key instead of refusing it
    ssh_connect_timeout_ms: int = 5_000  # reaching and logging in to the board
    ssh_command_timeout_ms: int = 30_000  # one command or one transfer step without an answer
    python: str = "python3"  # the board's interpreter for process containers (ssh boards)
    work_dir: str = ""  # where containers' working directories live; "" = under state_dir (local)
    # or ~/.infinibrain/<manager port> on an ssh board
    docker_host: str = ""  # the board's Docker engine; "" = $DOCKER_HOST or the local socket (local boards)
    surge: bool = True  # an update may run the new container beside the old one (false: one board at a time)
    image_transfer: str = "auto"  # ssh boards: "registry" (pull the layers it lacks), "sftp" (the whole tar),
    # "auto" (the registry when the main board has docker-registry and skopeo)


@dataclass(frozen=True)
class ManagerConfig:
    host: str = "127.0.0.1"  # the application side: inference, management and results ports
    # The container side (requests to containers, results from them): "" = the boards'
    # manager_address when they name one, else ``host`` when an ssh board is configured
    # (one address for both, as before board_host existed), else 127.0.0.1.
    board_host: str = ""
    # A listener off loopback without CURVE is refused unless this says the risk is wanted.
    allow_unauthenticated: bool = False
    port: int = 5570
    state_dir: str = ""
    heartbeat_interval_ms: int = 500
    send_queue_size: int = 256  # per inference (ContainerConfig.max_queue_size=None); a request beyond it gets 305
    # A waiting request's priority grows by one for every priority_aging_ms it waits, so a
    # request is never overtaken by one of priority p higher that came more than p times
    # this later (0: strict priorities, bounded by send_timeout alone).
    priority_aging_ms: int = 1_000
    default_send_timeout_ms: int = 10_000  # ContainerConfig.send_timeout=None
    default_wait_queue_timeout_ms: int = 30_000  # ContainerConfig.wait_queue_timeout=None; 0 = no limit
    default_max_send_num: int = 2  # ContainerConfig.max_send_num=None
    container_start_timeout_ms: int = 30_000  # a started container is ready (connected, warmed up) by then, or failed
    # An idle Connector says it is alive this often: a few times within liveness_timeout_ms
    # is enough (each beat of each idle container costs the manager a wake-up).
    container_heartbeat_ms: int = 2_500
    liveness_timeout_ms: int = 10_000  # idle and silent this long: unhealthy; unhealthy this long: restarted (policy)
    restart_stable_after_ms: int = 10_000  # running this long after a restart resets the restart backoff
    container_stop_timeout_ms: int = 5_000  # SIGTERM, then SIGKILL after this
    engine_timeout_ms: int = 120_000  # one Docker engine call (an image load can be long)
    client_timeout_ms: int = 10_000  # a silent client's queued requests are dropped after this
    max_message_size: int = P.DEFAULT_MAX_MESSAGE_SIZE  # bytes of one frame a peer may send (ZMQ_MAXMSGSIZE)
    max_header_size: int = P.DEFAULT_MAX_HEADER_SIZE  # bytes of a message's header (a request's param, a command)
    max_client_requests: int = 1_024  # requests one client may have waiting or in flight; beyond it 305
    max_client_bytes: int = 512 * 1024 * 1024  # bytes of request data one client may have waiting or in flight
    metrics_host: str = "127.0.0.1"  # Prometheus metrics (manager/metrics.py)
    metrics_port: int = 0  # 0 = base port + 5; -1 = no metrics
    telemetry_interval_ms: int = 1_000  # each board's sampler prints this often (manager/telemetry.py); 0 = off
    otlp_endpoint: str = ""  # OTLP/HTTP traces endpoint, e.g. http://127.0.0.1:4318/v1/traces (manager/tracing.py); "" = off
    trace_slow_ms: int = 1_000  # a traced request slower than this is exported even when its trace was not sampled
    registry_port: int = 0  # the image registry boards pull from, on 127.0.0.1; 0 = base port + 6
    log_level: str = "INFO"
    log_format: str = "text"  # "text" or "json" (one JSON object a line, for log collectors)
    # CurveZMQ on every socket (see docs/RELIABILITY.md). Key files are zmq.auth certificates.
    curve: bool = False
    curve_secret_key: str = ""  # the manager's secret certificate; "" = state_dir/keys/manager.key_secret
    curve_client_keys: str = ""  # folder of other allowed clients' public certificates ("" = only
    # the local application key pair, state_dir/keys/client.key_secret, which the manager makes)
    curve_container_keys: str = ""  # folder of allowed containers' public certificates, beside the
    # manager's own container key pair (state_dir/keys/containers.key_secret), which it hands to
    # the containers it starts
    # A manager group (manager/group.py, docs/OPERATIONS.md "A manager group"); "" = one
    # manager, its registry in state_dir. Every manager of a group has the same settings
    # here and the same boards, each its own host.
    etcd: str = ""  # etcd's client URLs, "http://127.0.0.1:2379[,...]"
    etcd_prefix: str = "/infinibrain"  # the group's keys in etcd
    etcd_ca_file: str = ""  # https URLs: the CA that signed etcd's certificate ("" = the public CAs requests knows)
    etcd_cert_file: str = ""  # a client certificate and its key, when etcd asks for one
    etcd_key_file: str = ""
    etcd_user: str = ""  # etcd's authentication: a user, and a file holding its password
    etcd_password_file: str = ""
    group_hosts: str = ""  # every manager's host, comma-separated: what applications and containers are told
    leader_lease_s: int = 3  # the leader's etcd lease: a standby leads within about twice this after it dies
    boards: tuple[BoardConfig, ...] = ()

    @property
    def state_path(self) -> Path:
        return Path(self.state_dir)


default_state_dir = security.default_state_dir


def embedded_default() -> ManagerConfig:
    """One board named ``local`` on this host, bound to 127.0.0.1, state per user."""
    return _finish(ManagerConfig(boards=(BoardConfig(name="local"),)))


def load_config(path: str | os.PathLike | None) -> ManagerConfig:
    if path is None:
        return embedded_default()
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return parse_config(data)


def parse_config_text(text: str) -> ManagerConfig:
    """A configuration from TOML text (``init`` checks what it writes with this)."""
    try:
        return parse_config(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}") from None


def parse_config(data: dict[str, Any]) -> ManagerConfig:
    _refuse_unknown(data, {"manager", "coprocessor"}, "top level")
    manager = data.get("manager", {})
    if not isinstance(manager, dict):
        raise ConfigError("[manager] must be a table")
    tables = data.get("coprocessor", [])
    if not isinstance(tables, list) or not tables:
        raise ConfigError("at least one [[coprocessor]] table is required")
    boards = []
    for i, board in enumerate(tables):
        where = f"coprocessor[{i}]"
        if not isinstance(board, dict) or "name" not in board:
            raise ConfigError(f"{where}.name is required")
        boards.append(BoardConfig(**_typed(board, BoardConfig, where)))
    return _finish(ManagerConfig(**_typed(manager, ManagerConfig, "manager", skip={"boards"}), boards=tuple(boards)))


def _typed(table: dict, cls: type, where: str, skip: set[str] = frozenset()) -> dict:  # type: ignore[assignment]
    known = {f.name: f for f in fields(cls) if f.name not in skip}
    _refuse_unknown(table, set(known), f"[{where}]")
    out = {}
    for key, value in table.items():
        expected = known[key].type  # a string: annotations are postponed
        if expected == "int" and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{key} must be an integer, got {value!r}")
        if expected == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{where}.{key} must be true or false, got {value!r}")
        if expected == "str" and not isinstance(value, str):
            raise ConfigError(f"{where}.{key} must be a string, got {value!r}")
        out[key] = value
    return out


def _refuse_unknown(table: dict, known: set[str], where: str) -> None:
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where} (known: {', '.join(sorted(known))})")


def _finish(cfg: ManagerConfig) -> ManagerConfig:
    """Check a configuration and fill in what depends on other settings: a new, complete one."""
    state_dir = os.path.abspath(os.path.expanduser(cfg.state_dir or default_state_dir()))
    cfg = replace(cfg, state_dir=state_dir, metrics_port=cfg.metrics_port or cfg.port + 5,
                  registry_port=cfg.registry_port or cfg.port + 6)
    _check_address(cfg.host, "manager.host")
    if cfg.etcd:
        cfg = _check_group(cfg)
    cfg = replace(cfg, board_host=cfg.board_host or _default_board_host(cfg))
    _check_address(cfg.board_host, "manager.board_host")
    _check_address(cfg.metrics_host, "manager.metrics_host")
    if not 1 <= cfg.registry_port <= 65535:
        raise ConfigError(f"manager.registry_port must be a port number or 0 (base port + 6), got {cfg.registry_port}")
    if not 0 <= cfg.telemetry_interval_ms <= 3_600_000 or 0 < cfg.telemetry_interval_ms < 100:
        raise ConfigError(f"manager.telemetry_interval_ms must be 0 (off) or from 100 to 3600000, got {cfg.telemetry_interval_ms}")
    if not (cfg.metrics_port == -1 or 1 <= cfg.metrics_port <= 65535):
        raise ConfigError(f"manager.metrics_port must be a port number, 0 (base port + 5) or -1 (off), got {cfg.metrics_port}")
    if not 1 <= cfg.port <= 65535 - 8:
        raise ConfigError(f"manager.port must be between 1 and 65527, got {cfg.port}")
    for key in (
        "heartbeat_interval_ms",
        "send_queue_size",
        "default_send_timeout_ms",
        "default_max_send_num",
        "container_start_timeout_ms",
        "container_heartbeat_ms",
        "liveness_timeout_ms",
        "restart_stable_after_ms",
        "container_stop_timeout_ms",
        "engine_timeout_ms",
        "client_timeout_ms",
        "max_message_size",
        "max_header_size",
        "max_client_requests",
        "max_client_bytes",
    ):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"manager.{key} must be positive, got {getattr(cfg, key)}")
    for key in ("default_wait_queue_timeout_ms", "priority_aging_ms"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"manager.{key} must be 0 (no limit) or positive, got {getattr(cfg, key)}")
    # A header is one frame: it cannot be larger than any frame may be.
    cfg = replace(cfg, max_header_size=min(cfg.max_header_size, cfg.max_message_size))
    if cfg.log_format not in ("text", "json"):
        raise ConfigError(f"manager.log_format must be 'text' or 'json', got {cfg.log_format!r}")
    if cfg.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"manager.log_level must be DEBUG, INFO, WARNING or ERROR, got {cfg.log_level!r}")
    if cfg.curve:
        cfg = _check_curve(cfg)
    seen: set[str] = set()
    boards = []
    for board in cfg.boards:
        where = f"coprocessor {board.name!r}"
        if not NAME_RE.match(board.name) or board.name == "all":
            raise ConfigError(f"{where}: name must be letters, digits, '.', '_' or '-' (and not 'all')")
        if board.name in seen:
            raise ConfigError(f"{where}: name is used twice")
        seen.add(board.name)
        if board.transport not in ("local", "ssh"):
            raise ConfigError(f"{where}: transport must be 'local' or 'ssh', got {board.transport!r}")
        if cfg.etcd:  # a group: containers are told every manager, and reach the one that leads
            board = replace(board, manager_address=cfg.group_hosts)
        else:
            board = replace(board, manager_address=board.manager_address or cfg.board_host)
            _check_address(board.manager_address, f"{where}.manager_address")
        if board.image_transfer not in ("auto", "registry", "sftp"):
            raise ConfigError(f"{where}.image_transfer must be 'auto', 'registry' or 'sftp', got {board.image_transfer!r}")
        if board.transport == "ssh":
            board = _check_ssh_board(board, where)
        boards.append(board)
    cfg = replace(cfg, boards=tuple(boards))
    _check_exposure(cfg)
    return cfg


is_loopback = security.is_loopback  # one definition for the SDK and the manager


def _default_board_host(cfg: ManagerConfig) -> str:
    named = {b.manager_address for b in cfg.boards if b.manager_address}
    if len(named) == 1:
        return named.pop()
    if any(b.transport == "ssh" for b in cfg.boards):
        return cfg.host
    return "127.0.0.1"


def exposed_listeners(cfg: ManagerConfig) -> list[tuple[str, str]]:
    """(setting, address) of each cluster listener bound off loopback."""
    return [(key, getattr(cfg, key)) for key in ("host", "board_host") if not is_loopback(getattr(cfg, key))]


def _check_exposure(cfg: ManagerConfig) -> None:
    """No listener off loopback without authentication, unless the risk is wanted."""
    exposed = exposed_listeners(cfg)
    if exposed and not cfg.curve and not cfg.allow_unauthenticated:
        key, address = exposed[0]
        side = ("applications' ports (inference and management commands)" if key == "host"
                else "the containers' ports")
        raise ConfigError(
            f"manager.{key} = {address!r} is not a loopback address and CURVE is off: anyone who reaches "
            f"{address} could use {side} without a key. Turn CURVE on (`infinibrain-manager init "
            f"--boards-network ADDRESS` writes such a configuration, with keys), or set "
            f"allow_unauthenticated = true in [manager] to accept the risk"
            + ("; to face only the boards, keep host = \"127.0.0.1\" and set board_host" if key == "host" else ""))
    for board in cfg.boards:
        if board.transport == "ssh" and not is_loopback(board.address) and is_loopback(board.manager_address):
            raise ConfigError(
                f"coprocessor {board.name!r} at {board.address} cannot reach the manager at {board.manager_address}: "
                f"set [manager] board_host (or its manager_address) to this host's address on the boards' network")


def _check_curve(cfg: ManagerConfig) -> ManagerConfig:
    keys = cfg.state_path / "keys"
    folders = {}
    for key in ("curve_client_keys", "curve_container_keys"):
        value = getattr(cfg, key)
        if value:
            value = os.path.abspath(os.path.expanduser(value))
            if not os.path.isdir(value):
                raise ConfigError(f"manager.{key} {value!r} is not a folder")
        folders[key] = value
    secret = os.path.expanduser(cfg.curve_secret_key) if cfg.curve_secret_key else str(keys / "manager.key_secret")
    return replace(cfg, curve_secret_key=secret, curve_client_keys=folders["curve_client_keys"],
                   curve_container_keys=folders["curve_container_keys"])


def _check_group(cfg: ManagerConfig) -> ManagerConfig:
    """A group member's settings: etcd's URLs, the group's hosts (this one among them); its
    containers' side is its own host unless board_host says otherwise."""
    urls = [u.strip() for u in cfg.etcd.split(",") if u.strip()]
    for url in urls:
        if not re.match(r"^https?://[^/\s]+$", url):
            raise ConfigError(f"manager.etcd: {url!r} is not an etcd client URL like http://127.0.0.1:2379")
    hosts = [h.strip() for h in cfg.group_hosts.split(",") if h.strip()]
    for h in hosts:
        _check_address(h, "manager.group_hosts")
    if cfg.host not in hosts:
        raise ConfigError(f"manager.group_hosts must list every manager of the group, this one's host {cfg.host!r} "
                          f"among them, comma-separated (got {cfg.group_hosts!r})")
    if not 2 <= cfg.leader_lease_s <= 60:
        raise ConfigError(f"manager.leader_lease_s must be from 2 to 60 seconds, got {cfg.leader_lease_s}")
    if not cfg.etcd_prefix.startswith("/") or cfg.etcd_prefix.endswith("/"):
        raise ConfigError(f"manager.etcd_prefix must start with '/' and not end with one, got {cfg.etcd_prefix!r}")
    files = {}
    for key in ("etcd_ca_file", "etcd_cert_file", "etcd_key_file", "etcd_password_file"):
        value = os.path.expanduser(getattr(cfg, key))
        if value and not os.path.isfile(value):
            raise ConfigError(f"manager.{key} {value!r} is not a file")
        files[key] = value
    if bool(files["etcd_cert_file"]) != bool(files["etcd_key_file"]):
        raise ConfigError("manager.etcd_cert_file and manager.etcd_key_file go together")
    if bool(cfg.etcd_user) != bool(files["etcd_password_file"]):
        raise ConfigError("manager.etcd_user and manager.etcd_password_file go together")
    return replace(cfg, etcd=",".join(urls), group_hosts=",".join(hosts), board_host=cfg.board_host or cfg.host, **files)


def _check_ssh_board(board: BoardConfig, where: str) -> BoardConfig:
    if not board.ssh_user:
        raise ConfigError(f"{where}: ssh_user is required for transport 'ssh'")
    if board.docker_host:
        raise ConfigError(f"{where}: docker_host is for local boards; an ssh board uses the Docker engine on the board")
    if not 1 <= board.ssh_port <= 65535:
        raise ConfigError(f"{where}.ssh_port must be between 1 and 65535, got {board.ssh_port}")
    for key in ("ssh_connect_timeout_ms", "ssh_command_timeout_ms"):
        if getattr(board, key) <= 0:
            raise ConfigError(f"{where}.{key} must be positive, got {getattr(board, key)}")
    return replace(board, known_hosts=os.path.expanduser(board.known_hosts or "~/.ssh/known_hosts"),
                   ssh_key=os.path.expanduser(board.ssh_key) if board.ssh_key else "")


def _check_address(value: str, key: str) -> None:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if value != "localhost":
            raise ConfigError(f"{key} must be an IP address, got {value!r}") from None
