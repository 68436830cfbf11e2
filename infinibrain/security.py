"""CurveZMQ keys: where they come from and how a socket is armed with them.

The manager, AICluster and the Connector all use this module, so key files are read and
sockets set up in one place. Keys are ZeroMQ certificates (``zmq.auth``): ``NAME.key``
holds a public key, ``NAME.key_secret`` a public and a secret key. Secret files are
written owner-only, and no function here logs a secret.

Where a client finds its keys (the reference's constructors take none):

- ``INFINIBRAIN_CURVE_SERVER_KEY``: the manager's public key, a ``.key`` file or the
  40-character Z85 text;
- ``INFINIBRAIN_CURVE_CLIENT_KEY``: this client's ``.key_secret`` file.

Without them, an application of the same user as a CURVE manager on this host needs
nothing: such a manager writes an *access file*, ``access/<port>.json`` in the user's
default state folder (``$XDG_STATE_HOME/infinibrain``, else ``~/.local/state/infinibrain``),
naming its public key and the local application key pair in its own (owner-only) state
folder; AICluster reads it when it connects to that port on a loopback address. A manager
without CURVE removes the file for its port.

A container started by the manager gets ``INFINIBRAIN_CURVE_SERVER_KEY``,
``INFINIBRAIN_CURVE_PUBLIC_KEY`` and ``INFINIBRAIN_CURVE_SECRET_KEY`` (Z85 text) in its
environment; ``INFINIBRAIN_CURVE_CLIENT_KEY`` (a file) works there too.

Pure: any thread, when a socket is made.
"""
from __future__ import annotations

import ipaddress
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import zmq
import zmq.auth

ENV_SERVER_KEY = "INFINIBRAIN_CURVE_SERVER_KEY"
ENV_CLIENT_KEY = "INFINIBRAIN_CURVE_CLIENT_KEY"
ENV_PUBLIC_KEY = "INFINIBRAIN_CURVE_PUBLIC_KEY"
ENV_SECRET_KEY = "INFINIBRAIN_CURVE_SECRET_KEY"
SECRET_ENV = (ENV_SECRET_KEY,)  # never written to logs, files or status results

Z85_KEY_LENGTH = 40


class KeyFileError(ValueError):
    """A key file or key text that cannot be used; the message names it (never its secret)."""


@dataclass(frozen=True)
class CurveKeys:
    """What a connecting socket needs: the server's public key and its own key pair."""

    server_public: bytes
    public: bytes
    secret: bytes

    def __repr__(self) -> str:  # the secret stays out of any log line that prints this
        return f"CurveKeys(server={self.server_public.decode()}, public={self.public.decode()})"


def curve_available() -> bool:
    return bool(zmq.has("curve"))


def load_public(value: str) -> bytes:
    """A public key from a certificate file or from its Z85 text."""
    value = value.strip()
    if len(value) == Z85_KEY_LENGTH and not os.path.exists(value):
        return value.encode()
    try:
        public, _ = zmq.auth.load_certificate(value)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read public key {value!r}: {exc}") from None
    if not public:
        raise KeyFileError(f"{value!r} holds no public key")
    return public


def load_pair(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) from a ``.key_secret`` certificate file."""
    try:
        public, secret = zmq.auth.load_certificate(os.fspath(path))
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read key pair {os.fspath(path)!r}: {exc}") from None
    if not public or not secret:
        raise KeyFileError(f"{os.fspath(path)!r} holds no secret key (give the .key_secret file)")
    return public, secret


def keys_from_env(env: Mapping[str, str] | None = None) -> CurveKeys | None:
    """The CURVE keys a client or container finds in its environment; None if CURVE is off."""
    env = os.environ if env is None else env
    server = env.get(ENV_SERVER_KEY, "")
    if not server:
        return None
    server_public = load_public(server)
    if env.get(ENV_SECRET_KEY):
        public, secret = env.get(ENV_PUBLIC_KEY, "").encode(), env[ENV_SECRET_KEY].encode()
        if len(public) != Z85_KEY_LENGTH or len(secret) != Z85_KEY_LENGTH:
            raise KeyFileError(f"{ENV_PUBLIC_KEY} and {ENV_SECRET_KEY} must be 40-character Z85 keys")
    elif env.get(ENV_CLIENT_KEY):
        public, secret = load_pair(env[ENV_CLIENT_KEY])
    else:
        raise KeyFileError(f"{ENV_SERVER_KEY} is set but no key pair: set {ENV_CLIENT_KEY} to this client's .key_secret file")
    return CurveKeys(server_public, public, secret)


def default_state_dir() -> str:
    """The user's default state folder (a manager without ``state_dir`` keeps its state here)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(base, "infinibrain")


def access_file(port: int) -> Path:
    """Where a CURVE manager on ``port`` tells local applications of the same user its keys."""
    return Path(default_state_dir()) / "access" / f"{int(port)}.json"


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an IP address or "localhost") is this host's loopback only."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def client_keys(host: str, port: int) -> CurveKeys | None:
    """The keys AICluster uses for the manager at ``host:port``: the environment's, else
    (a manager on this host) its access file; None: plain sockets."""
    keys = keys_from_env()
    if keys is not None or not is_loopback(host):
        return keys
    path = access_file(port)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"cannot read the access file {path}: {exc}") from None
    if not isinstance(data, dict) or not is_loopback(str(data.get("host", ""))):
        return None  # written by a manager whose applications connect from elsewhere
    public, secret = load_pair(str(data.get("client_key", "")))
    return CurveKeys(load_public(str(data.get("server_key", ""))), public, secret)


def arm_client(sock: zmq.Socket, keys: CurveKeys | None) -> None:
    """Make ``sock`` (before it connects) a CURVE client of the manager."""
    if keys is None:
        return
    sock.curve_serverkey = keys.server_public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


def arm_server(sock: zmq.Socket, secret: bytes, domain: str) -> None:
    """Make ``sock`` (before it binds) a CURVE server whose peers ZAP checks in ``domain``."""
    sock.curve_server = True
    sock.curve_secretkey = secret
    sock.zap_domain = domain.encode()


def generate(folder: str | os.PathLike, name: str) -> tuple[Path, Path]:
    """Make the key pair ``folder/name.key`` (public) and ``folder/name.key_secret``
    (owner-only); an existing pair is kept. Returns (public file, secret file)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    public_path, secret_path = folder / f"{name}.key", folder / f"{name}.key_secret"
    if secret_path.exists():
        load_pair(secret_path)  # refuse a damaged pair rather than overwrite it
        return public_path, secret_path
    # Written in a private temporary folder and moved, so the secret is never readable by others.
    scratch = tempfile.mkdtemp(dir=folder, prefix=".keygen-")
    try:
        made_public, made_secret = zmq.auth.create_certificates(scratch, name)
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_secret, secret_path)
        os.replace(made_public, public_path)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return public_path, secret_path


__all__ = [
    "CurveKeys",
    "ENV_CLIENT_KEY",
    "ENV_PUBLIC_KEY",
    "ENV_SECRET_KEY",
    "ENV_SERVER_KEY",
    "KeyFileError",
    "access_file",
    "arm_client",
    "arm_server",
    "client_keys",
    "curve_available",
    "default_state_dir",
    "generate",
    "keys_from_env",
    "load_pair",
    "is_loopback",
    "load_public",
]
