"""One Docker engine, as the manager sees it: a Docker SDK client, the state of our
containers on it, and its images.

Several boards may share one engine (emulated boards on a developer's machine): they share
one ``Engine`` too, and tell their containers apart by labels. The client is made on first
use, so a manager whose boards run only ``process`` containers never needs an engine. A
poller thread keeps the run state of our containers (found by the ``infinibrain.manager``
label) so that the router's exit checks read a dict instead of calling the engine.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import docker
import docker.errors
import paramiko
import requests.exceptions

from infinibrain.errors import InfinibrainException, make_error

from .. import progress

log = logging.getLogger(__name__)

LABEL_MANAGER = "infinibrain.manager"
POLL_INTERVAL = 0.5
CONNECT_TIMEOUT = 5.0
PROBE_API_VERSION = "1.24"  # only asks the engine which version it speaks
# What a call raises when the engine (or the SSH connection to its board) is not there.
UNREACHABLE = (requests.exceptions.ConnectionError, requests.exceptions.Timeout, paramiko.SSHException, EOFError, socket.timeout)


def engine_url(docker_host: str) -> str:
    """A board's ``docker_host`` setting as the engine's address ("" = Docker's default)."""
    return docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"


class Engine:
    # One load of a tag at a time per engine, across every board that reaches it (emulated
    # boards reach one engine through several addresses): the second finds it loaded.
    _loads: dict[tuple[str, str], threading.Lock] = {}
    _loads_lock = threading.Lock()

    def __init__(self, url: str, manager_id: str, timeout: float) -> None:
        self.url = engine_url(url)
        self.manager_id = manager_id
        self.timeout = timeout
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._info: tuple[float, dict] | None = None
        # container name -> (running, exit code, when seen); written by the poller and by our own calls
        self._states: dict[str, tuple[bool, int | None, float]] = {}
        self._state_lock = threading.Lock()
        self._closed = threading.Event()
        self._poller: threading.Thread | None = None

    # ---- connection ------------------------------------------------------------------

    @property
    def client(self) -> docker.DockerClient:
        """The SDK client; 500 if the engine does not answer."""
        with self._lock:
            if self._client is None:
                self._client = self._connect()
                self._poller = threading.Thread(target=self._poll, name="engine-poller", daemon=True)
                self._poller.start()
            return self._client

    def _connect(self) -> docker.DockerClient:
        """A client speaking the engine's own API version, asked with a short timeout so
        that an engine that is down fails fast."""
        try:
            probe = self._sdk_client(PROBE_API_VERSION, CONNECT_TIMEOUT)
            version = probe.api.version(api_version=False)["ApiVersion"]
            probe.close()
        except InfinibrainException:
            raise
        except (docker.errors.DockerException, *UNREACHABLE) as exc:
            raise self.unreachable("asking the Docker engine's version", exc) from None
        log.info("connected to the Docker engine at %s (API %s)", self.url, version)
        return self._sdk_client(version, self.timeout)

    def _sdk_client(self, version: str, timeout: float) -> docker.DockerClient:
        return docker.DockerClient(base_url=self.url, version=version, timeout=timeout)

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            if self._client is not None:
                self._client.close()

    @contextmanager
    def errors(self, doing: str) -> Iterator[None]:
        """Turn what the engine says into numbered errors: 500 when it cannot be reached,
        302 when it refuses what a container's settings ask for."""
        try:
            yield
        except InfinibrainException:
            raise
        except UNREACHABLE as exc:
            raise self.unreachable(doing, exc) from None
        except docker.errors.APIError as exc:
            raise make_error(302, detail=f"{doing}: the Docker engine refused: {exc.explanation or exc}") from None
        except docker.errors.DockerException as exc:
            raise make_error(302, detail=f"{doing}: {exc}") from None

    def unreachable(self, doing: str, exc: BaseException) -> InfinibrainException:
        """The 500 for a call that could not reach the engine."""
        return make_error(500, detail=f"{doing}: the Docker engine at {self.url} is not reachable: {_cause(exc)}")

    # ---- our containers' run state ------------------------------------------------------

    def _poll(self) -> None:
        while not self._closed.wait(POLL_INTERVAL):
            asked = time.monotonic()
            try:
                found = self.client.api.containers(all=True, filters={"label": f"{LABEL_MANAGER}={self.manager_id}"})
            except Exception as exc:  # the engine went away; keep the last known states
                log.debug("engine poll failed: %s", exc)
                continue
            states = {c["Names"][0].lstrip("/"): (c["State"] in ("running", "restarting", "paused"), _exit_code(c.get("Status", "")), asked) for c in found}
            with self._state_lock:
                # What our own calls recorded after the list was asked for is newer: keep it.
                states.update({n: s for n, s in self._states.items() if s[2] > asked})
                self._states = states

    def state(self, name: str) -> tuple[bool, int | None] | None:
        """(running, exit code) of one of our containers; None if the engine has none by that name."""
        found = self._states.get(name)
        return None if found is None else (found[0], found[1])

    def refresh(self, name: str) -> dict | None:
        """Inspect one container now (None if it does not exist) and record its state."""
        try:
            attrs = self.client.api.inspect_container(name)
        except docker.errors.NotFound:
            with self._state_lock:
                self._states.pop(name, None)
            return None
        running = bool(attrs["State"].get("Running"))
        with self._state_lock:
            self._states[name] = (running, None if running else attrs["State"].get("ExitCode"), time.monotonic())
        return attrs

    # ---- engine facts ---------------------------------------------------------------------

    def _facts(self) -> dict:
        now = time.monotonic()
        if self._info is None or now - self._info[0] > 60:
            self._info = (now, self.client.info())
        return self._info[1]

    def runtimes(self) -> list[str]:
        """The container runtimes the engine offers (runc, nvidia, ...), cached for a minute."""
        return sorted(self._facts().get("Runtimes") or {})

    def identity(self) -> str:
        """The engine's own ID: emulated boards reach one engine through several addresses,
        and must not remove an image that another board's container still uses."""
        try:
            return self._facts().get("ID") or self.url
        except Exception:  # unreachable: it cannot be told apart from others, so it is its own
            return self.url

    # ---- images -------------------------------------------------------------------------

    def image(self, tag: str) -> dict | None:
        """The engine's description of image ``tag``; None if it has no such image."""
        try:
            return self.client.api.inspect_image(tag)
        except docker.errors.ImageNotFound:
            return None

    def ensure_image(self, tag: str, tar_path: str | None) -> tuple[dict, dict]:
        """Image ``tag``'s description, loading it from ``tar_path`` (a ``docker save`` tar)
        first if the engine lacks it. One load per tag and engine at a time. Also returns what
        the load took ({} when the image was there already): bytes, seconds to send and to load."""
        found = self.image(tag)
        if found is not None:
            return found, {}
        with Engine._loads_lock:
            lock = Engine._loads.setdefault((self.identity(), tag), threading.Lock())
        with lock:
            found = self.image(tag)
            if found is not None:
                return found, {}
            if not tar_path:
                raise make_error(302, detail=f"image {tag!r} is not on the engine and image_path/image_filename do not name a file to load it from")
            try:
                size = os.path.getsize(tar_path)
            except OSError as exc:
                raise make_error(302, detail=f"image file {tar_path!r} cannot be opened on the main board: {exc.strerror}") from None
            started = time.monotonic()
            figures = {"image": tag, "image_bytes": size, **self._load(tar_path, tag)}
            loaded = figures.pop("loaded")
            figures["load_seconds"] = round(time.monotonic() - started - figures.get("transfer_seconds", 0.0), 3)
            log.info("loaded %s from %s on %s (%.0f MB in %.1f s)", ", ".join(loaded) or "nothing", tar_path, self.url,
                     size / 1e6, time.monotonic() - started)
            self._tag_loaded(tag, tar_path, loaded)
            return self.image(tag) or {}, figures

    def _load(self, tar_path: str, tag: str) -> dict:
        """Load a ``docker save`` tar into the engine: {"loaded": [what it loaded]}."""
        loaded: list[str] = []
        with open(tar_path, "rb") as fh:
            transfer = progress.Transfer(self.url, f"loading {os.path.basename(tar_path)}", os.path.getsize(tar_path))
            reader = progress.CountingReader(fh, transfer)
            try:
                for chunk in self.client.api.load_image(reader, quiet=True):
                    if chunk.get("error") or chunk.get("errorDetail"):
                        detail = chunk.get("error") or chunk["errorDetail"].get("message")
                        raise make_error(302, detail=f"image file {tar_path!r} could not be loaded: {detail}")
                    loaded.extend(loaded_names(chunk.get("stream") or ""))
            except docker.errors.APIError as exc:
                raise make_error(302, detail=f"image file {tar_path!r} could not be loaded: {exc.explanation or exc}") from None
        return {"loaded": loaded}

    def _tag_loaded(self, tag: str, tar_path: str, loaded: list[str]) -> None:
        if self.image(tag) is not None:
            return
        if len(loaded) == 1:  # an untagged or differently tagged single image: give it our tag
            repo, _, version = tag.rpartition(":") if ":" in tag.split("/")[-1] else (tag, "", "latest")
            self.client.api.tag(loaded[0], repo, version or "latest")
            return
        raise make_error(302, detail=f"image file {tar_path!r} holds {', '.join(loaded) or 'no image'}, not image_tag {tag!r}")

    def images(self) -> list[dict]:
        """The engine's images, as get_images reports them."""
        out = []
        for img in self.client.api.images():
            tags = [t for t in img.get("RepoTags") or [] if t != "<none>:<none>"]
            out.append(
                {
                    "tag": tags[0] if tags else "<none>",
                    "tags": tags,
                    "id": img["Id"].split(":")[-1][:12],
                    "size": img.get("Size", 0),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(img.get("Created", 0))),
                }
            )
        return sorted(out, key=lambda i: i["tag"])

    def remove_image(self, tag: str) -> bool:
        """Remove ``tag``; False (and a log line) if a container still uses it."""
        try:
            self.client.api.remove_image(tag)
        except docker.errors.ImageNotFound:
            return False
        except docker.errors.APIError as exc:
            if exc.status_code == 409:
                log.warning("image %s is kept: %s", tag, exc.explanation)
                return False
            raise
        log.info("removed image %s", tag)
        return True


def loaded_names(text: str) -> list[str]:
    """What ``docker load`` says it loaded ("Loaded image: x:y" / "Loaded image ID: sha256:...")."""
    out = []
    for line in text.splitlines():
        for prefix in ("Loaded image: ", "Loaded image ID: "):
            if line.startswith(prefix):
                out.append(line[len(prefix):].strip())
    return out


def _exit_code(status: str) -> int | None:
    """``Exited (137) 2 seconds ago`` -> 137."""
    if status.startswith("Exited (") and ")" in status:
        try:
            return int(status[len("Exited ("):status.index(")")])
        except ValueError:
            return -1
    return None


def _cause(exc: BaseException) -> str:
    """The innermost reason of a connection error, without urllib3's object reprs."""
    text = str(exc)
    for marker in ("Caused by ", "Connection aborted."):
        if marker in text:
            text = text[text.index(marker):]
    return text[:300]
