"""CurveZMQ on the manager's sockets: its key pair, who may connect, and who each peer is.

With ``curve = true`` every manager socket is a CURVE server. ZeroMQ's ZAP handler (a
``zmq.auth`` ThreadAuthenticator) accepts a peer only if its public key is allowed:

- on the three client ports, applications' keys, each with a **role**: ``manage`` (every
  API: the keys in ``curve_client_keys`` itself, and the manager's own key pair for local
  applications, ``state_dir/keys/client.key_secret``) or ``infer`` (inference and
  read-only calls only: the keys in ``curve_client_keys/infer/``);
- on the two container ports, containers' keys: **one key pair per container instance**,
  made when the instance is (``grant``), kept owner-only in ``state_dir/keys/instances/``
  so a restarted manager and a restarted container use it again, and revoked when the
  instance goes (``revoke``); plus the keys in ``curve_container_keys`` for programs run by
  hand as ``other`` containers.

A key of one side never passes on the other. ZAP gives each message of a peer its key
(the ``User-Id`` property, the key's Z85 text); ``role_of`` and ``owner_of`` turn it into
what the key may do, so the router believes a message for what its connection proved, not
for what it says. A key dropped into a folder is accepted without a restart. The local
application pair is announced to applications of the same user through an access file
(``write_access_file``; AICluster reads it with ``security.client_keys``). Without CURVE,
nothing here runs, the sockets are plain, every peer counts as its claims (a loopback
manager trusts its host's users), and an access file left for this port is removed.

The router thread arms its sockets, grants and revokes here; ZAP runs on pyzmq's
authenticator thread, which reads the key folders and the granted keys (under a lock).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from infinibrain import security

from .config import ConfigError, ManagerConfig
from .store import atomic_write

log = logging.getLogger(__name__)

CLIENTS = "clients"  # ZAP domains
CONTAINERS = "containers"
MANAGE, INFER = "manage", "infer"  # what an application key may do
BY_HAND = "*"  # the owner of a curve_container_keys key: any ``other`` container


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
    """The public keys of one ZAP domain, each with what it is (a role, or an owner):
    fixed ones, granted ones, and a folder (with, for clients, an ``infer/`` folder
    inside), read again when an unknown key knocks and a folder has changed (so keys
    added while the manager runs are taken). ZAP's thread reads, the router thread grants."""

    def __init__(self, domain: str, folder: str, fixed: dict[bytes, str], folder_role: str,
                 roles: dict[str, str] | None = None) -> None:
        self.domain = domain
        self.folders = {folder: folder_role} if folder else {}
        for sub, role in (roles or {}).items():
            if folder:
                self.folders[os.path.join(folder, sub)] = role
        self.fixed = dict(fixed)
        self.keys: dict[bytes, str] = {}
        self._lock = threading.Lock()
        self._read_versions: dict[str, int | None] = {}
        self._denied_logged: set[bytes] = set()
        self.denied = 0
        self._read()

    def _read(self) -> None:
        """Read a folder again if a file was added or removed since the last time."""
        for folder, role in self.folders.items():
            try:
                version: int | None = os.stat(folder).st_mtime_ns
            except OSError:
                version = None
            if version is not None and version != self._read_versions.get(folder):
                self._read_versions[folder] = version
                found = {k: role for k in zmq.auth.load_certificates(folder)}
                with self._lock:
                    self.keys = {k: r for k, r in self.keys.items() if r != role or k in found} | found

    def grant(self, key: bytes, what: str) -> None:
        with self._lock:
            self.fixed[key] = what

    def revoke(self, what: str) -> None:
        """The keys granted as ``what`` are no longer allowed."""
        with self._lock:
            self.fixed = {k: v for k, v in self.fixed.items() if v != what}

    def what(self, key: bytes) -> str | None:
        """The role (or owner) of ``key``; None when it is not allowed (or no longer)."""
        with self._lock:
            return self.fixed.get(key) or self.keys.get(key)

    def callback(self, domain: str, key: bytes) -> bool:
        if self.what(key) is not None:
            return True
        self._read()
        if self.what(key) is not None:
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
            local_key = security.generate(keys, "client")[1]
            local_public = security.load_pair(local_key)[0]
        except security.KeyFileError as exc:
            raise ConfigError(f"manager.curve_secret_key: {exc}") from None
        self.instance_keys = keys / "instances"  # one pair per container instance (grant, revoke)
        self.allowed = {
            CLIENTS: AllowedKeys(CLIENTS, config.curve_client_keys, {local_public: MANAGE}, MANAGE, {"infer": INFER}),
            CONTAINERS: AllowedKeys(CONTAINERS, config.curve_container_keys, {}, BY_HAND),
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

    # ---- one key per container ---------------------------------------------------------------

    def grant(self, instance: str) -> dict[str, str]:
        """The key pair of container instance ``instance`` (made the first time, kept for a
        restarted manager or container), now allowed on the container ports as that
        instance alone: what its environment needs to pass them ({} without CURVE)."""
        if not self.enabled:
            return {}
        try:
            public, secret = security.load_pair(security.generate(self.instance_keys, instance)[1])
        except (OSError, security.KeyFileError) as exc:
            raise ConfigError(f"cannot make the key pair of container {instance}: {exc}") from None
        self.allowed[CONTAINERS].grant(public, instance)
        return {security.ENV_SERVER_KEY: self.public.decode(), security.ENV_PUBLIC_KEY: public.decode(),
                security.ENV_SECRET_KEY: secret.decode()}

    def revoke(self, instance: str) -> None:
        """Container instance ``instance`` is gone: its key is refused from now on, and deleted."""
        if not self.enabled:
            return
        self.allowed[CONTAINERS].revoke(instance)  # by owner: no need to read its key back
        for path in (self.instance_keys / f"{instance}.key", self.instance_keys / f"{instance}.key_secret"):
            try:
                path.unlink()
            except FileNotFoundError:
                pass

    # ---- who a peer is -----------------------------------------------------------------------

    def owner_of(self, user_id: str) -> str | None:
        """The container instance a container key belongs to (``BY_HAND`` for a key of
        ``curve_container_keys``); None for a key that is not (or no longer) allowed."""
        return self.allowed[CONTAINERS].what(user_id.encode())

    def role_of(self, user_id: str) -> str | None:
        """``MANAGE`` or ``INFER`` for an application key; None for one not allowed."""
        return self.allowed[CLIENTS].what(user_id.encode())

    def denied(self) -> dict[str, int]:
        return {domain: keyset.denied for domain, keyset in self.allowed.items()} if self.enabled else {}

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
            self.auth = None
