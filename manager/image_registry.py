"""The image registry on the main board, from which SSH boards pull only the layers they lack.

A real registry: Debian's ``docker-registry`` (the Distribution project's registry),
started by the manager on 127.0.0.1 only (``registry_port``, default base port + 6), its
storage in ``<state_dir>/registry``, stopped with the manager. An image tar of a config
(``image_path`` + ``image_filename``) is pushed into it with Debian's ``skopeo`` (which
uploads only the blobs the registry does not have yet); a board's Docker engine pulls it
through a reverse port forward on the board's SSH connection (ssh.SSHLink.forward): the
board's 127.0.0.1:<port> leads to the registry, so nothing new listens on any network and
Docker's rule that registries on 127.0.0.0/8 may speak plain HTTP applies. An update that
changes only the top layer of an image moves only that layer to each board.

Used from worker threads; one push of a tar at a time.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from infinibrain.errors import make_error

log = logging.getLogger(__name__)

START_TIMEOUT = 15.0


def available() -> str:
    """"" if this machine can run the registry, else what is missing."""
    missing = [p for p in ("docker-registry", "skopeo") if shutil.which(p) is None]
    return f"{' and '.join(missing)} not installed (apt-get install docker-registry skopeo)" if missing else ""


def reference(image_tag: str) -> str:
    """``image_tag`` as a path in the registry (a tag of its own when it has none)."""
    name, _, tag = image_tag.rpartition(":") if ":" in image_tag.split("/")[-1] else (image_tag, "", "latest")
    return f"{name}:{tag or 'latest'}"


class ImageRegistry:
    def __init__(self, state_dir: str, port: int) -> None:
        self.root = Path(state_dir) / "registry"
        self.port = port
        self._proc: subprocess.Popen | None = None
        self._lock = threading.Lock()
        self._pushed: dict[tuple[str, str], tuple[float, int]] = {}  # (tar, tag) -> (mtime, size) pushed

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ensure_running(self) -> None:
        """Start the registry if it is not running (500 naming what is missing if it cannot be)."""
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                return
            missing = available()
            if missing:
                raise make_error(500, detail=f"the main board's image registry cannot run: {missing}; "
                                             "or set image_transfer = \"sftp\" for the board")
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            config = self.root / "config.yml"
            config.write_text(
                "version: 0.1\n"
                "log:\n  level: warn\n"
                f"storage:\n  filesystem:\n    rootdirectory: {self.root / 'data'}\n  delete:\n    enabled: true\n"
                f"http:\n  addr: {self.address}\n"
            )
            logfile = open(self.root / "registry.log", "ab")
            self._proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=logfile, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL)
            logfile.close()
            deadline = time.monotonic() + START_TIMEOUT
            while time.monotonic() < deadline:
                if self._answers():
                    log.info("image registry on %s (pid %d), storage in %s", self.address, self._proc.pid, self.root)
                    return
                if self._proc.poll() is not None:
                    break
                time.sleep(0.1)
            tail = (self.root / "registry.log").read_text(errors="replace")[-500:]
            self.stop()
            raise make_error(500, detail=f"the main board's image registry did not start on {self.address}: {tail}")

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def push(self, tar: str, image_tag: str) -> str:
        """Put the image ``image_tag`` of the ``docker save`` tar into the registry (only the
        blobs it lacks); returns its reference there, without the registry's address."""
        self.ensure_running()
        ref = reference(image_tag)
        stat = os.stat(tar)
        key = (os.path.abspath(tar), ref)
        with self._lock:
            if self._pushed.get(key) == (stat.st_mtime, stat.st_size):
                return ref
            started = time.monotonic()
            source = f"docker-archive:{tar}"
            out = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", source, f"docker://{self.address}/{ref}"],
                                 capture_output=True, text=True, timeout=3600)
            if out.returncode != 0 and "more than one image" in (out.stderr or ""):
                out = subprocess.run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"{source}:{image_tag}",
                                      f"docker://{self.address}/{ref}"], capture_output=True, text=True, timeout=3600)
            if out.returncode != 0:
                raise make_error(302, detail=f"image file {tar!r} could not be put into the registry: {out.stderr.strip()[-500:]}")
            self._pushed[key] = (stat.st_mtime, stat.st_size)
            log.info("image %s from %s is in the registry (%.1f s)", ref, tar, time.monotonic() - started)
        return ref

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
