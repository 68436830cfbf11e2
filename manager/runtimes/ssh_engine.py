"""A remote board's Docker engine, reached through the board's one SSH connection.

Container work goes through the Docker SDK exactly as on a local engine: docker-py's own
SSH connection pool runs ``docker system dial-stdio`` on the board for each HTTP
connection, but on a channel of our ``SSHLink`` (host key checked, our key, our timeouts,
reconnected when it drops) instead of a connection of its own. Images are different: the
tar is sent once over SFTP (with progress, into ``<name>.part`` renamed when complete) and
``docker load -i`` runs on the board, so a transfer cut off halfway never loads anything and
the next try starts clean. The board needs the docker CLI (for dial-stdio and load), and
the SSH user must be allowed to use the engine (the ``docker`` group).

Worker threads (operations.py); the engine's poll runs on a thread of its own.
"""
from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shlex
import socket
import time

import docker
import docker.errors
import paramiko
import requests.exceptions
from docker.transport.sshconn import SSHConnectionPool, SSHHTTPAdapter

from infinibrain.errors import InfinibrainException, make_error

from .. import progress
from ..image_registry import ImageRegistry
from ..ssh import SSHLink
from .engine import Engine, _cause, loaded_names

log = logging.getLogger(__name__)


class _LinkAdapter(SSHHTTPAdapter):
    """docker-py's SSH transport on the board's shared connection instead of its own."""

    def __init__(self, link: SSHLink, timeout: float) -> None:
        self.link = link
        super().__init__(f"ssh://{link.board.address}", timeout=timeout, shell_out=True)  # makes no client

    def get_connection(self, url, proxies=None):
        client = self.link.client()
        with self.pools.lock:
            pool = self.pools.get(url)
            if pool is not None and pool.ssh_transport is client.get_transport():
                return pool
            # New or reconnected: a pool on the dead transport would fail every request.
            pool = SSHConnectionPool(ssh_client=client, timeout=self.timeout, maxsize=self.max_pool_size, host=self.ssh_host)
            self.pools[url] = pool
        return pool


class SSHEngine(Engine):
    def __init__(self, link: SSHLink, manager_id: str, timeout: float, upload_dir: str,
                 registry: ImageRegistry | None = None) -> None:
        board = link.board
        super().__init__(f"ssh://{board.ssh_user}@{board.address}:{board.ssh_port}", manager_id, timeout)
        self.link = link
        self.upload_dir = upload_dir
        self.registry = registry  # None: whole tars over SFTP (image_transfer = "sftp")

    def _sdk_client(self, version: str, timeout: float) -> docker.DockerClient:
        client = docker.DockerClient(base_url=self.url, version=version, timeout=timeout, use_ssh_client=True)
        adapter = _LinkAdapter(self.link, timeout)
        client.api._custom_adapter = adapter  # what APIClient.close() and its socket helpers use
        client.api.mount("http+docker://ssh", adapter)
        return client

    def unreachable(self, doing: str, exc: BaseException) -> InfinibrainException:
        if isinstance(exc, (requests.exceptions.Timeout, socket.timeout)):
            self.link.drop()  # a board that stopped answering: start over on the next call
        if isinstance(exc, (paramiko.SSHException, EOFError, socket.timeout)):
            return self.link.failed(doing, exc)
        detail = _cause(exc)
        if "dial-stdio" in detail or "docker: not found" in detail:
            detail = "the docker CLI is missing on the board (docker system dial-stdio failed)"
        return make_error(500, detail=f"{self.link.where}: {doing}: the Docker engine does not answer: {detail}")

    def _load(self, tar_path: str, tag: str) -> dict:
        if self.registry is not None:
            return self._pull(tar_path, tag)
        # One name per tar file: a retry after a cut-off transfer overwrites its .part.
        name = hashlib.sha256(os.path.abspath(tar_path).encode()).hexdigest()[:16] + ".tar"
        remote = posixpath.join(self.upload_dir, name)
        sent = self.link.upload(tar_path, remote, what=os.path.basename(tar_path))
        q = shlex.quote(remote)
        status, out, err = self.link.run(f"docker load -i {q}; s=$?; rm -f {q}; exit $s", timeout=self.timeout)
        if status != 0:
            raise make_error(302, detail=f"image file {tar_path!r} could not be loaded on board {self.link.board.name!r}: {(err or out).strip()[-500:]}")
        return {"loaded": loaded_names(out), "transfer_seconds": sent["seconds"]}

    def _pull(self, tar_path: str, tag: str) -> dict:
        """The image through the main board's registry: pushed there from the tar, then
        pulled by the board's engine through a reverse forward of the board's connection,
        which moves only the layers the board lacks."""
        ref = self.registry.push(tar_path, tag)  # type: ignore[union-attr]
        port = self.link.forward(self.registry.port)  # type: ignore[union-attr]
        source = f"127.0.0.1:{port}/{ref}"
        repo, _, version = source.rpartition(":")
        before, started = self.link.forwarded_bytes, time.monotonic()
        layers: dict[str, tuple[int, int]] = {}
        stage = f"pulling {os.path.basename(tar_path)}"
        for event in self.client.api.pull(repo, version, stream=True, decode=True):
            if event.get("error"):
                raise make_error(302, detail=f"board {self.link.board.name!r} could not pull {tag} from the registry: {event['error']}")
            detail = event.get("progressDetail") or {}
            if event.get("id") and detail.get("total"):
                layers[event["id"]] = (detail.get("current", 0), detail["total"])
                progress.report(stage, sum(c for c, _ in layers.values()), sum(t for _, t in layers.values()))
        name, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
        self.client.api.tag(source, name, version or "latest")
        self.client.api.remove_image(source, noprune=True)
        moved = self.link.forwarded_bytes - before
        seconds = time.monotonic() - started
        log.info("%s: pulled %s through the registry (%.1f MB moved in %.2f s)", self.link.where, tag, moved / 1e6, seconds)
        return {"loaded": [tag], "transfer_seconds": round(seconds, 3), "image_bytes": moved, "via": "registry"}
