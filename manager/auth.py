"""CurveZMQ on the manager's sockets: its key pair, and who may connect.

With ``curve = true`` every manager socket is a CURVE server. ZeroMQ's ZAP handler (a
``zmq.auth`` ThreadAuthenticator) accepts a peer only if its public key is allowed:
clients' keys (``curve_client_keys`` and the manager's own key pair for local
applications, ``state_dir/keys/client.key_secret``) on the three client ports,
containers' keys (``curve_container_keys`` and the manager's own container key pair) on
the two container ports. A key of one side never passes on the other. A key dropped
into one of those folders is accepted without a restart. The local application pair is
announced to applications of the same user through an access file
(``write_access_file``; AICluster reads it with ``security.client_keys``). Without CURVE, nothing here runs, the sockets are plain,
and an access file left for this port is removed.

The router thread arms its sockets here; ZAP runs on pyzmq's authenticator thread, which reads the key folders.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from infinibrain import security

from .config import ConfigError, ManagerConfig
from .registry import atomic_write

log = logging.getLogger(__name__)

CLIENTS = "clients"  # ZAP domains
CONTAINERS = "containers"


def write_access_file(port: int, host: str, server_public: bytes, client_key: str | os.PathLike) -> Path:
    """Tell applications of this user on this host how to reach the CURVE manager on
    ``port`` (``security.access_file``; owner-only, written whole or not at all)."""
    path = security.access_file(port)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(path, json.dumps({"host": host, "port": int(port), "server_key": server_public.decode(),
                                   "client_key": os.fspath(client_key)}, indent=2) + "\n")
    return path


def remove_access_file(port: int) -> None:
    """A manager without CURVE on ``port``: local applications must not try keys on it."""
    path = security.access_file(port)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # not ours to remove: a client will fail its handshake and say why
        log.warning("cannot remove %s: %s", path, exc)


class AllowedKeys:
    """The public keys of one ZAP domain: fixed ones plus a folder, read again when an
    unknown key knocks and the folder has changed (so keys added while the manager runs
    are taken)."""

    def __init__(self, domain: str, folder: str, fixed: set[bytes] = frozenset()) -> None:  # type: ignore[assignment]
        self.domain = domain
        self.folder = folder
        self.fixed = set(fixed)
        self.keys: set[bytes] = set()
        self._read_version: int | None = None
        self._denied_logged: set[bytes] = set()
        self.denied = 0
        self._read()

    def _version(self) -> int | None:
        try:
            return os.stat(self.folder).st_mtime_ns if self.folder else None
        except OSError:
            return None

    def _read(self) -> None:
        """Read the folder again if a file was added or removed since the last time."""
        version = self._version()
        if version is not None and version != self._read_version:
            self._read_version = version
            self.keys = set(zmq.auth.load_certificates(self.folder))

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.fixed or key in self.keys:
            return True
        self._read()
        if key in self.keys:
            return True
        self.denied += 1
        if key not in self._denied_logged and len(self._denied_logged) < 1000:
            self._denied_logged.add(key)
            log.warning("refused a %s connection with unknown CURVE public key %s", self.domain[:-1], key.decode())
        return False


class Guard:
    """Arms the manager's sockets with CURVE (or leaves them plain) and hands containers
    their keys."""

    def __init__(self, config: ManagerConfig, ctx: zmq.Context) -> None:
        self.enabled = config.curve
        self.auth: ThreadAuthenticator | None = None
        if not self.enabled:
            remove_access_file(config.port)
            return
        if not security.curve_available():
            raise ConfigError("manager.curve = true, but this pyzmq/libzmq has no CURVE support")
        keys = config.state_path / "keys"
        secret_file = Path(config.curve_secret_key)
        if not secret_file.exists() and secret_file == keys / "manager.key_secret":
            security.generate(keys, "manager")  # the default pair is made on first start
        if secret_file.exists() and secret_file.stat().st_mode & 0o077:
            log.warning("%s can be read by other users: chmod 600 it", secret_file)
        try:
            self.public, self.secret = security.load_pair(secret_file)
            self.container_public, self.container_secret = security.load_pair(security.generate(keys, "containers")[1])
            local_key = security.generate(keys, "client")[1]
            local_public = security.load_pair(local_key)[0]
        except security.KeyFileError as exc:
            raise ConfigError(f"manager.curve_secret_key: {exc}") from None
        self.allowed = {
            CLIENTS: AllowedKeys(CLIENTS, config.curve_client_keys, {local_public}),
            CONTAINERS: AllowedKeys(CONTAINERS, config.curve_container_keys, {self.container_public}),
        }
        self.auth = ThreadAuthenticator(ctx, log=logging.getLogger("infinibrain.manager.zap"))
        self.auth.start()
        for domain, keyset in self.allowed.items():
            self.auth.configure_curve_callback(domain, keyset)
        log.info("CURVE on: manager public key %s", self.public.decode())
        try:
            where = write_access_file(config.port, config.host, self.public, local_key)
            log.info("applications of this user on this host find their keys in %s", where)
        except OSError as exc:  # the manager serves anyway; applications then need the environment
            log.warning("cannot write the access file for local applications: %s", exc)

    def arm(self, sock: zmq.Socket, domain: str) -> None:
        if self.enabled:
            security.arm_server(sock, self.secret, domain)

    def container_env(self) -> dict[str, str]:
        """What a container needs in its environment to pass the container ports."""
        if not self.enabled:
            return {}
        return {
            security.ENV_SERVER_KEY: self.public.decode(),
            security.ENV_PUBLIC_KEY: self.container_public.decode(),
            security.ENV_SECRET_KEY: self.container_secret.decode(),
        }

    def denied(self) -> dict[str, int]:
        return {domain: keyset.denied for domain, keyset in self.allowed.items()} if self.enabled else {}

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
