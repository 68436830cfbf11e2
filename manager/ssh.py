"""One SSH connection per remote board (paramiko), shared by everything that talks to it.

``SSHLink`` logs in with the board's key (or the SSH agent's), checks the board's host key
against ``known_hosts`` (unknown or changed keys are refused unless the board opts in to
recording new ones), and reconnects on the next use after the connection drops. Every
failure to reach the board is SSHConnectionException (500) naming the board and the cause,
raised within the board's connect or command timeout. Commands run as ``sh -c`` scripts
built with ``shlex.quote``, never from unquoted text; files go over SFTP.

Worker threads share a board's one connection (a channel each); reconnecting takes a lock.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import os
import posixpath
import shlex
import stat
import socket
import threading
import time

import paramiko

from infinibrain.errors import InfinibrainException, error_from_code, make_error

from . import progress
from .config import BoardConfig, ConfigError

log = logging.getLogger(__name__)

KEEPALIVE_S = 5  # a dead board is noticed within a few of these even when idle
# Larger SSH windows and packets than paramiko's defaults: image tars are hundreds of MB.
WINDOW_SIZE = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
SFTP_REQUEST = 255 * 1024  # OpenSSH sftp-server: messages up to 256 kB, writes up to 255 kB (limits@openssh.com)

# What a connection that went away raises, wherever in paramiko it is noticed.
LINK_ERRORS = (paramiko.SSHException, EOFError, OSError)


def fingerprint(key: paramiko.PKey) -> str:
    """The key's fingerprint as OpenSSH prints it (``SHA256:...``)."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


def load_user_key(board: BoardConfig) -> paramiko.PKey | None:
    """The board's private key (None: use the SSH agent). ConfigError names the board and
    the key, so a bad key stops the manager at start-up rather than at the first deploy."""
    where = f"coprocessor {board.name!r}"
    if not board.ssh_key:
        if not os.environ.get("SSH_AUTH_SOCK"):
            raise ConfigError(f"{where}: no ssh_key is set and no SSH agent is running (SSH_AUTH_SOCK is unset)")
        return None
    try:
        return paramiko.PKey.from_path(board.ssh_key)
    except FileNotFoundError:
        raise ConfigError(f"{where}: ssh_key {board.ssh_key} does not exist") from None
    except PermissionError:
        raise ConfigError(f"{where}: ssh_key {board.ssh_key} cannot be read (permission denied)") from None
    except paramiko.PasswordRequiredException:
        raise ConfigError(f"{where}: ssh_key {board.ssh_key} is encrypted; load it into an SSH agent and leave ssh_key empty") from None
    except (paramiko.SSHException, ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: ssh_key {board.ssh_key} is not a usable private key: {exc}") from None


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown host: refuse with the fingerprint, or record it when the board opts in."""

    def __init__(self, link: "SSHLink") -> None:
        self.link = link

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: paramiko.PKey) -> None:
        board = self.link.board
        if not board.accept_new_host_keys:
            raise make_error(
                500,
                detail=f"{self.link.where}: its host key {key.get_name()} {fingerprint(key)} is not in {board.known_hosts}; "
                "check the fingerprint on the board (ssh-keygen -lf /etc/ssh/ssh_host_*_key.pub) and add it, "
                "or set accept_new_host_keys = true",
            )
        os.makedirs(os.path.dirname(board.known_hosts) or ".", mode=0o700, exist_ok=True)
        with open(board.known_hosts, "a") as fh:
            fh.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        log.warning("%s: recorded its new host key %s %s in %s", self.link.where, key.get_name(), fingerprint(key), board.known_hosts)


class SSHLink:
    def __init__(self, board: BoardConfig) -> None:
        self.board = board
        self.where = f"board {board.name!r} ({board.ssh_user}@{board.address}:{board.ssh_port})"
        self.connect_timeout = board.ssh_connect_timeout_ms / 1000
        self.command_timeout = board.ssh_command_timeout_ms / 1000
        self._key = load_user_key(board)
        self._client: paramiko.SSHClient | None = None
        self._failure: tuple[float, InfinibrainException] | None = None  # the last failed connect
        self._lock = threading.Lock()
        self._forwards: dict[int, tuple[paramiko.Transport, int]] = {}  # port here -> (on which connection, port there)
        self.forwarded_bytes = 0  # bytes sent to the board through forwards (e.g. image layers pulled)

    # ---- the connection ------------------------------------------------------------

    def client(self) -> paramiko.SSHClient:
        """The board's SSH connection, made (again) if there is none alive; 500 if it cannot be.
        Callers that waited while an attempt failed get that attempt's 500 at once, so the
        commands queued behind a dead board fail together instead of each timing out."""
        asked = time.monotonic()
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return self._client
                self._client.close()
                self._client = None
                log.warning("%s: the SSH connection was lost; reconnecting", self.where)
            if self._failure is not None and self._failure[0] >= asked:
                raise error_from_code(self._failure[1].code, self._failure[1].message, self._failure[1].detail)
            try:
                self._client = self._connect()
            except InfinibrainException as exc:
                if self._failure is None:
                    log.warning("%s is unreachable: %s", self.where, exc.text)
                self._failure = (time.monotonic(), exc)
                raise
            if self._failure is not None:
                log.warning("%s is reachable again", self.where)
                self._failure = None
            return self._client

    def _connect(self) -> paramiko.SSHClient:
        client = paramiko.SSHClient()
        if os.path.exists(self.board.known_hosts):
            try:
                client.load_host_keys(self.board.known_hosts)
            except (OSError, paramiko.SSHException) as exc:
                raise make_error(500, detail=f"{self.where}: known_hosts {self.board.known_hosts} cannot be read: {exc}") from None
        client.set_missing_host_key_policy(_HostKeyPolicy(self))
        t = self.connect_timeout
        try:
            client.connect(
                self.board.address, self.board.ssh_port, self.board.ssh_user,
                pkey=self._key, allow_agent=self._key is None, look_for_keys=False,
                timeout=t, banner_timeout=t, auth_timeout=t, channel_timeout=t,
            )
        except InfinibrainException:
            client.close()
            raise
        except paramiko.BadHostKeyException as exc:
            client.close()
            raise make_error(
                500,
                detail=f"{self.where}: its host key CHANGED: it offers {exc.key.get_name()} {fingerprint(exc.key)}, "
                f"{self.board.known_hosts} has {fingerprint(exc.expected_key)}; refused (remove the old line only if the board was reinstalled)",
            ) from None
        except paramiko.AuthenticationException as exc:
            client.close()
            key = self.board.ssh_key or "the SSH agent's keys"
            raise make_error(500, detail=f"{self.where}: the board refused {key} for user {self.board.ssh_user!r}: {exc}") from None
        except (socket.timeout, TimeoutError):
            client.close()
            raise make_error(500, detail=f"{self.where}: no answer within {t:g} s") from None
        except LINK_ERRORS as exc:
            client.close()
            raise make_error(500, detail=f"{self.where}: cannot connect: {_reason(exc)}") from None
        transport = client.get_transport()
        transport.set_keepalive(KEEPALIVE_S)
        transport.default_window_size = WINDOW_SIZE
        transport.default_max_packet_size = MAX_PACKET
        log.info("%s: connected (host key %s)", self.where, fingerprint(transport.get_remote_server_key()))
        return client

    def drop(self) -> None:
        """Close the connection after a failure, so that the next use makes a new one."""
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    close = drop

    def failed(self, doing: str, exc: BaseException) -> InfinibrainException:
        """The 500 for ``exc`` raised while ``doing`` something on the board."""
        if isinstance(exc, InfinibrainException):
            return exc
        self.drop()
        reason = f"no answer within {self.command_timeout:g} s" if isinstance(exc, (socket.timeout, TimeoutError)) else _reason(exc)
        return make_error(500, detail=f"{self.where}: {doing}: {reason}")

    # ---- commands ----------------------------------------------------------------------

    def run(self, script: str, timeout: float | None = None) -> tuple[int, str, str]:
        """Run a ``sh`` script on the board: (exit status, stdout, stderr). 500 if the board
        cannot be reached or says nothing for ``timeout`` seconds (the command timeout)."""
        timeout = timeout or self.command_timeout
        try:
            channel = self._exec(script, timeout)
            out = channel.makefile("rb").read()
            err = channel.makefile_stderr("rb").read()
            if not channel.status_event.wait(timeout):
                raise socket.timeout()
            status = channel.recv_exit_status()
            channel.close()
        except LINK_ERRORS as exc:
            raise self.failed(f"running {script.split()[0]!r}", exc) from None
        return status, out.decode(errors="replace"), err.decode(errors="replace")

    def stream(self, script: str, timeout: float | None = None) -> paramiko.Channel:
        """Start a long-lived ``sh`` script on the board and return its channel, to read its
        output as it comes (the telemetry sampler); a read that waits ``timeout`` seconds
        (the command timeout) raises. Closing the channel ends the script (SIGPIPE)."""
        try:
            return self._exec(script, timeout or self.command_timeout)
        except LINK_ERRORS as exc:
            raise self.failed("starting a long-lived command", exc) from None

    def _exec(self, script: str, timeout: float) -> paramiko.Channel:
        """A new channel on the connection running ``script`` with ``sh``; reads wait ``timeout`` s."""
        channel = self.client().get_transport().open_session(timeout=self.connect_timeout)
        channel.settimeout(timeout)
        channel.exec_command(f"sh -c {shlex.quote(script)}")
        return channel

    def check(self, script: str, what: str, timeout: float | None = None) -> str:
        """``run`` that turns a failing script into 302 naming ``what``."""
        status, out, err = self.run(script, timeout)
        if status != 0:
            raise make_error(302, detail=f"board {self.board.name!r}: {what} failed ({status}): {(err or out).strip()[-500:]}")
        return out

    # ---- a way back to the main board -----------------------------------------------------

    def forward(self, port: int) -> int:
        """A port on the board's 127.0.0.1 that leads to ``port`` on this machine's 127.0.0.1
        (a reverse port forward on the board's connection: nothing new listens on any
        network). Made once per connection; 500 if the board refuses it."""
        transport = self.client().get_transport()
        with self._lock:
            found = self._forwards.get(port)
            if found is not None and found[0] is transport:
                return found[1]
            try:
                there = transport.request_port_forward("127.0.0.1", 0, handler=lambda ch, _o, _s: self._relay(ch, port))
            except LINK_ERRORS as exc:
                raise self.failed("opening a port forward (AllowTcpForwarding in its sshd_config?)", exc) from None
            self._forwards[port] = (transport, there)
            log.info("%s: its 127.0.0.1:%d leads to the main board's 127.0.0.1:%d", self.where, there, port)
            return there

    def _relay(self, channel: paramiko.Channel, port: int) -> None:
        """One connection through a forward (paramiko's thread calls this: it must not block)."""

        def pump() -> None:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=self.connect_timeout)
            except OSError as exc:
                log.warning("%s: forward to 127.0.0.1:%d: %s", self.where, port, exc)
                channel.close()
                return
            sock.settimeout(None)
            back = threading.Thread(target=_copy, args=(channel, sock, None), daemon=True, name="forward-in")
            back.start()
            _copy(sock, channel, self._count)
            back.join(self.command_timeout)
            sock.close()
            channel.close()

        threading.Thread(target=pump, daemon=True, name=f"forward-{self.board.name}").start()

    def _count(self, n: int) -> None:
        with self._lock:
            self.forwarded_bytes += n

    # ---- files -------------------------------------------------------------------------

    def sftp(self) -> paramiko.SFTPClient:
        """A new SFTP session on the shared connection (cheap; one per operation keeps
        concurrent commands out of each other's way). Close it when done."""
        try:
            sftp = self.client().open_sftp()
            sftp.get_channel().settimeout(self.command_timeout)
            return sftp
        except LINK_ERRORS as exc:
            raise self.failed("opening SFTP", exc) from None

    def upload(self, local: str, remote: str, what: str = "") -> dict:
        """Copy ``local`` to ``remote`` on the board through ``remote.part``, renamed only
        when complete, so nothing ever reads half a file. Progress is logged every 10 %;
        returns {"bytes", "seconds"}."""
        size = os.path.getsize(local)
        started = time.monotonic()
        report = progress.Transfer(self.where, f"sending {what or os.path.basename(local)}", size)
        part = f"{remote}.part"
        sftp = self.sftp()
        try:
            makedirs(sftp, posixpath.dirname(remote))
            with open(local, "rb") as src, sftp.open(part, "wb") as dst:
                dst.MAX_REQUEST_SIZE = SFTP_REQUEST
                dst.set_pipelined(True)
                sent = 0
                while True:
                    chunk = src.read(4 * 1024 * 1024)
                    if not chunk:
                        break
                    dst.write(chunk)
                    sent += len(chunk)
                    report(sent)
            sftp.posix_rename(part, remote)
        except LINK_ERRORS as exc:
            _remove_quietly(sftp, part)
            raise self.failed(f"sending {what or local}", exc) from None
        finally:
            sftp.close()
        seconds = time.monotonic() - started
        log.info("%s: sent %s (%.0f MB in %.2f s, %.0f MB/s)", self.where, what or local, size / 1e6, seconds, size / 1e6 / max(seconds, 1e-6))
        return {"bytes": size, "seconds": round(seconds, 3)}


def makedirs(sftp: paramiko.SFTPClient, folder: str) -> None:
    """``mkdir -p`` over SFTP (no shell started on the board)."""
    missing = []
    while folder not in ("", "/", "."):
        try:
            sftp.stat(folder)
            break
        except FileNotFoundError:
            missing.append(folder)
            folder = posixpath.dirname(folder)
    for path in reversed(missing):
        try:
            sftp.mkdir(path, 0o755)
        except OSError:
            # Made meanwhile by someone else (boards deployed in parallel may share a home);
            # anything else is still an error.
            if not stat.S_ISDIR(sftp.stat(path).st_mode):
                raise


def _copy(src, dst, count) -> None:
    """Copy ``src`` to ``dst`` (a socket or a channel) until ``src`` ends; ``count(n)`` each chunk."""
    try:
        while True:
            chunk = src.recv(256 * 1024)
            if not chunk:
                break
            dst.sendall(chunk)
            if count is not None:
                count(len(chunk))
    except (OSError, EOFError, paramiko.SSHException):
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR) if isinstance(dst, socket.socket) else dst.shutdown_write()
        except (OSError, EOFError, paramiko.SSHException):
            pass


def _remove_quietly(sftp: paramiko.SFTPClient, path: str) -> None:
    # The connection may be what failed; a leftover .part is overwritten by the next try.
    try:
        sftp.remove(path)
    except Exception:
        pass


def _reason(exc: BaseException) -> str:
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError):  # per address tried: say why
        return "; ".join(f"{addr[0]} port {addr[1]}: {err.strerror or err}" for addr, err in exc.errors.items())
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
