"""``infinibrain image build SPEC``: an inference image from a small declarative description.

A spec is a TOML file with one ``[image]`` table::

    [image]
    tag = "mycompany/face-detector:1"      # required
    from = "runtime"                       # infinibrain/runtime for the platform (default), or any image
    platform = "linux/arm64"               # default: this machine's
    apt = ["libgomp1"]                     # Debian packages, from the archive the base image names
    pip = ["opencv-python-headless==4.10.0.84"]  # PyPI packages: binary wheels only (no compiler)
    files = [{ from = "detect.py", to = "/app/" }, { from = "models", to = "/app/models" }]
    env = { OMP_NUM_THREADS = "1" }
    workdir = "/app"
    command = ["python3", "detect.py"]
    save = "dist/face-detector-1.tar"      # also write the docker save tar load_inference takes

Paths are relative to the spec's folder. The image is built by the local Docker engine with
the host's network (``--network host``: the engine ``make test`` starts has no bridge), so
``apt`` reaches the Debian archive the base image's sources name; nothing else is fetched
from inside the build. PyPI packages are downloaded here, by this machine's pip (with its
configuration: index, proxy, certificates), as binary wheels for the image's platform and
Python (``--only-binary=:all:``: no compiler, no sdist), and served to the build from a
loopback-only web server; inside, pip runs from the wheel the runtime image carries
(``/opt/infinibrain/pip.whl``), installs from those wheels only, and leaves nothing of
itself or of them behind. Packages the image has from Debian (numpy, pyzmq, msgpack)
satisfy dependencies. Each of apt, pip and files is one layer, in that order, so a change
to your files rebuilds (and ships) only the top layer.

The command's main thread, and one thread of its own serving the wheels to the build.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import io
import json
import os
import platform as host_platform
import shlex
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from ._toml import read_toml
from .errors import make_error

KEYS = {"tag", "from", "platform", "apt", "pip", "files", "env", "workdir", "command", "save"}
PIP = "/opt/infinibrain/pip.whl/pip"


def host_platform_name() -> str:
    machine = host_platform.machine()
    return "linux/" + {"x86_64": "amd64", "aarch64": "arm64"}.get(machine, machine)


def runtime_for(platform: str) -> str:
    """infinibrain/runtime for a platform (containers/build.py's tags)."""
    arch = platform.split("/")[-1]
    return "infinibrain/runtime:latest" if platform == host_platform_name() else f"infinibrain/runtime:{arch}"


@dataclass
class Spec:
    """An image to build, as the spec file says (paths resolved)."""

    tag: str
    base: str
    platform: str
    apt: list[str] = field(default_factory=list)
    pip: list[str] = field(default_factory=list)
    files: list[tuple[Path, str]] = field(default_factory=list)  # (here, to in the image)
    env: dict[str, str] = field(default_factory=dict)
    workdir: str = ""
    command: list[str] = field(default_factory=list)
    save: Path | None = None

    def dockerfile(self) -> str:
        lines = [f"FROM {self.base}"]
        if self.apt:
            lines.append("RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                         + " ".join(shlex.quote(p) for p in self.apt)
                         + " && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc /usr/share/man")
        if self.pip:
            # The wheels come from build() (a loopback web server on WHEELS_PORT): nothing else.
            lines.append("ARG WHEELS_PORT")
            lines.append(f"RUN python3 {PIP} install --no-index --find-links http://127.0.0.1:$WHEELS_PORT/ --no-cache-dir "
                         "--only-binary=:all: --break-system-packages --root-user-action=ignore --disable-pip-version-check "
                         + " ".join(shlex.quote(p) for p in self.pip))
        for i, (here, to) in enumerate(self.files):
            # A folder's contents go into ``to``; a file into ``to`` if it ends with "/", else as ``to``.
            source = _in_context(i, here) + ("/" if here.is_dir() else "")
            lines.append(f"COPY {json.dumps([source, to])}")
        for k, v in sorted(self.env.items()):
            lines.append(f"ENV {k}={json.dumps(v)}")
        if self.workdir:
            lines.append(f"WORKDIR {json.dumps(self.workdir)}")
        if self.command:
            lines.append(f"CMD {json.dumps(self.command)}")
        return "\n".join(lines) + "\n"

    def context(self) -> io.BytesIO:
        """The build context: the Dockerfile and the files, nothing else (with fixed times,
        so an unchanged file is a layer-cache hit)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            data = self.dockerfile().encode()
            info = tarfile.TarInfo("Dockerfile")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            for i, (here, _to) in enumerate(self.files):
                tar.add(str(here), arcname=_in_context(i, here), filter=_steady)
        buf.seek(0)
        return buf


def _in_context(i: int, here: Path) -> str:
    """Where the ``i``-th of the spec's files is in the build context."""
    return f"files/{i}" if here.is_dir() else f"files/{i}/{here.name}"


def _steady(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if "__pycache__" in info.name or info.name.endswith(".pyc"):
        return None
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def load_spec(path: str | os.PathLike) -> Spec:
    """The spec in ``path``; 302 naming what is wrong (301 when it cannot be read)."""
    path = Path(path)
    data = read_toml(path)
    table = data.get("image")
    if set(data) != {"image"} or not isinstance(table, dict):
        raise make_error(302, detail=f"{path}: a spec is one [image] table")
    unknown = sorted(set(table) - KEYS)
    if unknown:
        raise make_error(302, detail=f"{path}: unknown key {unknown[0]!r} in [image] (keys: {', '.join(sorted(KEYS))})")

    def strings(key: str) -> list[str]:
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise make_error(302, detail=f"{path}: image.{key} must be a list of strings")
        return value

    tag = table.get("tag")
    if not isinstance(tag, str) or not tag:
        raise make_error(201, detail=f"{path}: image.tag")
    platform = table.get("platform") or host_platform_name()
    if platform not in ("linux/amd64", "linux/arm64"):
        raise make_error(302, detail=f"{path}: image.platform must be linux/amd64 or linux/arm64, got {platform!r}")
    base = table.get("from", "runtime")
    base = runtime_for(platform) if base == "runtime" else base
    files = []
    for entry in table.get("files", []):
        if not isinstance(entry, dict) or set(entry) != {"from", "to"} or not all(isinstance(v, str) for v in entry.values()):
            raise make_error(302, detail=f"{path}: each of image.files is {{from = \"...\", to = \"/...\"}}")
        here = (path.parent / entry["from"]).resolve()
        if not here.exists():
            raise make_error(302, detail=f"{path}: image.files: {entry['from']!r} does not exist ({here})")
        if not entry["to"].startswith("/"):
            raise make_error(302, detail=f"{path}: image.files: to {entry['to']!r} must be an absolute path in the image")
        files.append((here, entry["to"]))
    env = table.get("env", {})
    if not isinstance(env, dict) or not all(isinstance(v, str) for v in env.values()):
        raise make_error(302, detail=f"{path}: image.env is a table of strings")
    command = table.get("command", [])
    if isinstance(command, str):
        command = shlex.split(command)
    if not isinstance(command, list) or not all(isinstance(c, str) for c in command):
        raise make_error(302, detail=f"{path}: image.command is a list of strings (or one string)")
    save = table.get("save")
    return Spec(tag, base, platform, strings("apt"), strings("pip"), files, env, str(table.get("workdir") or ""),
                command, (path.parent / save).resolve() if isinstance(save, str) and save else None)


@dataclass
class Built:
    tag: str
    image_id: str
    size: int  # bytes, the whole image
    layers: list[tuple[str, int]]  # (the step that made it, bytes), newest first
    seconds: float
    tar: Path | None = None
    tar_size: int = 0


def build(spec: Spec, say: Callable[[str], None] = lambda line: None, client: Any = None) -> Built:
    """Build ``spec`` on the local Docker engine (and save its tar when it says so)."""
    import docker

    client = client or docker.from_env(version="auto", timeout=3600)
    started = time.monotonic()
    try:
        client.images.get(spec.base)
    except docker.errors.ImageNotFound:
        hint = " (make test or containers/build.py builds it)" if spec.base.startswith("infinibrain/") else ""
        raise make_error(302, detail=f"base image {spec.base} is not on the engine{hint}") from None
    with _wheels(client, spec, say) as port:
        stream = client.api.build(fileobj=spec.context(), custom_context=True, tag=spec.tag, rm=True, forcerm=True,
                                  network_mode="host", platform=spec.platform, decode=True,
                                  buildargs={"WHEELS_PORT": str(port)} if port else {})
        for chunk in stream:
            if "error" in chunk:
                raise make_error(302, detail=f"building {spec.tag} failed: {chunk['error'].strip()}")
            line = (chunk.get("stream") or "").rstrip()
            if line:
                say(line)
    image = client.images.get(spec.tag)
    layers = [(" ".join((h.get("CreatedBy") or "").split())[:100], h.get("Size", 0)) for h in image.history()]
    built = Built(spec.tag, image.id, image.attrs.get("Size", 0), layers, round(time.monotonic() - started, 1))
    if spec.save is not None:
        spec.save.parent.mkdir(parents=True, exist_ok=True)
        partial = spec.save.with_suffix(".partial")
        with open(partial, "wb") as fh:
            for piece in image.save(named=True):
                fh.write(piece)
        partial.rename(spec.save)
        built.tar, built.tar_size = spec.save, spec.save.stat().st_size
    return built


@contextlib.contextmanager
def _wheels(client: Any, spec: Spec, say: Callable[[str], None]) -> Iterator[int]:
    """The wheels ``spec.pip`` needs, for the image's platform and Python, downloaded by this
    machine's pip and served on a loopback port for the build (0: nothing to serve)."""
    if not spec.pip:
        yield 0
        return
    python, glibc = _image_python(client, spec)
    machine = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}[spec.platform]
    major, minor = (int(x) for x in glibc.split(".")[:2])
    platforms = [f"manylinux2014_{machine}"] + [f"manylinux_2_{m}_{machine}" for m in range(17, minor + 1)] if major == 2 else []
    folder = cache_dir() / "wheels" / f"{spec.platform.replace('/', '-')}-cp{python}"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--abi", f"cp{python}", "-d", str(folder)]
    for platform in platforms:
        cmd += ["--platform", platform]
    say(f"downloading wheels for {spec.platform}, CPython {python[0]}.{python[1:]}: {' '.join(spec.pip)}")
    out = subprocess.run(cmd + spec.pip, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise make_error(302, detail=f"pip could not download {' '.join(spec.pip)} as binary wheels for {spec.platform}: "
                                     f"{(out.stderr or out.stdout).strip()[-800:]}")
    handler = functools.partial(_QuietHandler, directory=str(folder))
    # The port is part of the pip step's cache key: the same for the same packages, so an
    # unchanged step is a cache hit (another port only if that one is taken).
    steady = 20000 + int(hashlib.sha256(" ".join(spec.pip).encode()).hexdigest(), 16) % 10000
    try:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", steady), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="wheels")
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


def _image_python(client: Any, spec: Spec) -> tuple[str, str]:
    """(Python version as "311", glibc version) of the base image, asked of it (no network)."""
    probe = "import platform, sys; print('%d%d' % sys.version_info[:2], platform.libc_ver()[1])"
    out = client.containers.run(spec.base, ["python3", "-c", probe], remove=True, network_mode="none",
                                platform=spec.platform).decode().split()
    return out[0], out[1]


def cache_dir() -> Path:
    """What builds keep between runs (base image tars, wheels, the example's photograph):
    ``$INFINIBRAIN_CACHE``, else ``~/.cache/infinibrain``."""
    path = Path(os.environ.get("INFINIBRAIN_CACHE") or Path.home() / ".cache" / "infinibrain")
    path.mkdir(parents=True, exist_ok=True)
    return path


TIPS = """to keep it small: prefer PyPI's headless/-cpu wheels (opencv-python-headless, onnxruntime) to
Debian's desktop packages (python3-opencv brings a GUI stack); list apt packages with
--no-install-recommends in mind; keep models in `files` (the top layer) so an update ships only them"""
