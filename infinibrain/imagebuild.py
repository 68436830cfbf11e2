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
    no_deps = false                        # pip installs only what pip lists, not their dependencies
    constraints = ["numpy<2"]              # pip constraints: versions pip may choose, nothing installed by them
    keep = ["numpy"]                       # packages of the base image pip must not replace (their versions are pinned)
    check = ["import cv2", "python3 detect.py --self-test"]  # run in the built image: a failure fails the build

Paths are relative to the spec's folder. The image is built by the local Docker engine with
the host's network (``--network host``: the engine ``make test`` starts has no bridge), so
``apt`` reaches the Debian archive the base image's sources name; nothing else is fetched
from inside the build. PyPI packages are downloaded here, by this machine's pip (with its
configuration: index, proxy, certificates), as binary wheels for the image's platform and
Python (``--only-binary=:all:``: no compiler, no sdist), and served to the build from a
loopback-only web server; inside, pip runs from the wheel the runtime image carries
(``/opt/infinibrain/pip.whl``), installs from those wheels only, and leaves nothing of
itself or of them behind. Packages the image has from Debian (numpy, pyzmq, msgpack)
satisfy dependencies; a package pip replaces anyway (a newer numpy, say) is named in a
warning, and ``keep`` forbids it. Each of apt, pip and files is one layer, in that order,
so a change to your files rebuilds (and ships) only the top layer. ``check`` runs in the
built image with no network (an entry starting ``import``/``from`` with python3, any
other with sh): the image is built under a tag of its own and given its tag only once
every check passed, so a failed build leaves the tag on what it named before.

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

KEYS = {"tag", "from", "platform", "apt", "pip", "files", "env", "workdir", "command", "save",
        "no_deps", "constraints", "keep", "check"}
PIP = "/opt/infinibrain/pip.whl/pip"
CHECK_TIMEOUT = 600  # seconds one of a spec's checks may run (under emulation a model's first run is slow)


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
    no_deps: bool = False
    constraints: list[str] = field(default_factory=list)
    keep: list[str] = field(default_factory=list)
    check: list[str] = field(default_factory=list)

    def pip_options(self) -> list[str]:
        return ["--no-deps"] if self.no_deps else []

    def dockerfile(self) -> str:
        lines = [f"FROM {self.base}"]
        if self.apt:
            lines.append("RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
                         + " ".join(shlex.quote(p) for p in self.apt)
                         + " && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /usr/share/doc /usr/share/man")
        if self.pip:
            # The wheels come from build() (a loopback web server on WHEELS_PORT): nothing else.
            lines.append("ARG WHEELS_PORT")
            lines.append("ARG CONSTRAINTS")
            lines.append(f"RUN python3 {PIP} install --no-index --find-links http://127.0.0.1:$WHEELS_PORT/ --no-cache-dir "
                         "--only-binary=:all: --break-system-packages --root-user-action=ignore --disable-pip-version-check "
                         "${CONSTRAINTS:+-c http://127.0.0.1:$WHEELS_PORT/$CONSTRAINTS} "
                         + " ".join(shlex.quote(p) for p in [*self.pip_options(), *self.pip]))
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
    no_deps = table.get("no_deps", False)
    if not isinstance(no_deps, bool):
        raise make_error(302, detail=f"{path}: image.no_deps must be true or false")
    if (table.get("constraints") or table.get("keep") or no_deps) and not table.get("pip"):
        raise make_error(302, detail=f"{path}: image.no_deps, constraints and keep are for pip: give image.pip too")
    return Spec(tag, base, platform, strings("apt"), strings("pip"), files, env, str(table.get("workdir") or ""),
                command, (path.parent / save).resolve() if isinstance(save, str) and save else None,
                no_deps, strings("constraints"), strings("keep"), strings("check"))


@dataclass
class Built:
    tag: str
    image_id: str
    size: int  # bytes, the whole image
    layers: list[tuple[str, int]]  # (the step that made it, bytes), largest first
    seconds: float
    tar: Path | None = None
    tar_size: int = 0
    replaced: list[tuple[str, str, str]] = field(default_factory=list)  # (package, base's version, now)
    checked: list[str] = field(default_factory=list)


def build(spec: Spec, say: Callable[[str], None] = lambda line: None, client: Any = None) -> Built:
    """Build ``spec`` on the local Docker engine, run its checks (and save its tar when it says so)."""
    import docker

    client = client or docker.from_env(version="auto", timeout=3600)
    started = time.monotonic()
    try:
        client.images.get(spec.base)
    except docker.errors.ImageNotFound:
        hint = " (make test or containers/build.py builds it)" if spec.base.startswith("infinibrain/") else ""
        raise make_error(302, detail=f"base image {spec.base} is not on the engine{hint}") from None
    base = _probe(client, spec.base, spec.platform) if spec.pip else {}
    # Built under a tag of its own and given spec.tag once its checks pass: a build that
    # fails them leaves what spec.tag named before as it was.
    candidate = f"{docker.utils.parse_repository_tag(spec.tag)[0]}:candidate-{os.getpid()}"
    with _wheels(spec, base, say) as (port, constraints):
        args = {"WHEELS_PORT": str(port), "CONSTRAINTS": constraints} if port else {}
        stream = client.api.build(fileobj=spec.context(), custom_context=True, tag=candidate, rm=True, forcerm=True,
                                  network_mode="host", platform=spec.platform, decode=True, buildargs=args)
        for chunk in stream:
            if "error" in chunk:
                raise make_error(302, detail=f"building {spec.tag} failed: {chunk['error'].strip()}")
            line = (chunk.get("stream") or "").rstrip()
            if line:
                say(line)
    try:
        image = _checked(client, spec, candidate, say)
    finally:
        client.images.remove(candidate, noprune=True)
    layers = sorted(((" ".join((h.get("CreatedBy") or "").split())[:100], h.get("Size", 0)) for h in image.history()),
                    key=lambda layer: -layer[1])
    built = Built(spec.tag, image.id, image.attrs.get("Size", 0), layers, 0.0, checked=list(spec.check))
    if spec.pip:
        now = _probe(client, spec.tag, spec.platform)["dists"]
        built.replaced = sorted((name, old, now[name]) for name, old in base["dists"].items() if name in now and now[name] != old)
    built.seconds = round(time.monotonic() - started, 1)
    if spec.save is not None:
        spec.save.parent.mkdir(parents=True, exist_ok=True)
        partial = spec.save.with_suffix(".partial")
        with open(partial, "wb") as fh:
            for piece in image.save(named=True):
                fh.write(piece)
        partial.rename(spec.save)
        built.tar, built.tar_size = spec.save, spec.save.stat().st_size
    return built


def _checked(client: Any, spec: Spec, candidate: str, say: Callable[[str], None]) -> Any:
    """The image built as ``candidate``, tagged ``spec.tag`` once each of the spec's checks
    ran in it (no network) and passed; 302 naming the first that failed."""
    import docker

    for check in spec.check:
        argv = ["python3", "-c", check] if check.split()[0] in ("import", "from") else ["sh", "-c", check]
        say(f"check: {check}")
        container = client.containers.run(candidate, argv, detach=True, network_mode="none", platform=spec.platform,
                                          entrypoint=[])
        try:
            try:
                status = container.wait(timeout=CHECK_TIMEOUT)["StatusCode"]
            except Exception:  # the engine's wait timed out: the check hangs
                container.kill()
                raise make_error(302, detail=f"{spec.tag}: check {check!r} did not end within {CHECK_TIMEOUT} s; "
                                             f"{spec.tag} was left as it was") from None
            if status != 0:
                raise _check_failed(spec, check, status, container.logs(stdout=True, stderr=True).decode(errors="replace"))
        finally:
            container.remove(force=True)
    repository, tag = docker.utils.parse_repository_tag(spec.tag)
    image = client.images.get(candidate)
    image.tag(repository, tag or "latest")
    image.reload()  # its tags now name spec.tag (save(named=True) writes them)
    return image


def _check_failed(spec: Spec, check: str, status: int, output: str) -> Exception:
    output = output.strip()[-600:]
    hint = ""
    if status in (132, 134, 139):
        hint = (" (the program crashed; under emulation (qemu) a native wheel built for newer CPUs may crash: "
                "try an older version of the package for this platform)") if spec.platform != host_platform_name() else " (the program crashed)"
    return make_error(302, detail=f"{spec.tag}: check {check!r} failed with status {status}{hint}: {output or 'no output'}; "
                                  f"{spec.tag} was left as it was")


@contextlib.contextmanager
def _wheels(spec: Spec, base: dict, say: Callable[[str], None]) -> Iterator[tuple[int, str]]:
    """The wheels ``spec.pip`` needs, for the image's platform and Python, downloaded by this
    machine's pip and served on a loopback port for the build, with the constraints file's
    name there ((0, ""): nothing to serve)."""
    if not spec.pip:
        yield 0, ""
        return
    python, glibc = base["python"], base["glibc"]
    machine = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}[spec.platform]
    major, minor = (int(x) for x in glibc.split(".")[:2])
    platforms = [f"manylinux2014_{machine}"] + [f"manylinux_2_{m}_{machine}" for m in range(17, minor + 1)] if major == 2 else []
    folder = cache_dir() / "wheels" / f"{spec.platform.replace('/', '-')}-cp{python}"
    folder.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", "--python-version", python,
           "--implementation", "cp", "--abi", f"cp{python}", "-d", str(folder), *spec.pip_options()]
    for platform in platforms:
        cmd += ["--platform", platform]
    constraints = _constraints(spec, base["dists"])
    name = ""
    if constraints:
        name = f"constraints-{hashlib.sha256(constraints.encode()).hexdigest()[:12]}.txt"
        (folder / name).write_text(constraints)
        cmd += ["-c", str(folder / name)]
    say(f"downloading wheels for {spec.platform}, CPython {python[0]}.{python[1:]}: {' '.join(spec.pip)}")
    out = subprocess.run(cmd + spec.pip, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise make_error(302, detail=f"pip could not download {' '.join(spec.pip)} as binary wheels for {spec.platform}"
                                     f"{' within the constraints and keep' if constraints else ''}: "
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
        yield server.server_address[1], name
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _constraints(spec: Spec, base_dists: dict[str, str]) -> str:
    """The pip constraints of ``spec``: its own, and its ``keep`` packages at the base's versions."""
    lines = list(spec.constraints)
    for package in spec.keep:
        key = _dist_key(package)
        if key not in base_dists:
            raise make_error(302, detail=f"image.keep: the base image {spec.base} has no Python package {package!r} "
                                         f"(it has: {', '.join(sorted(base_dists)) or 'none'})")
        lines.append(f"{key}=={base_dists[key]}")
    return "\n".join(lines) + "\n" if lines else ""


def _dist_key(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        pass


PROBE = ("import importlib.metadata as m, json, platform, sys; print(json.dumps({'python': '%d%d' % sys.version_info[:2], "
         "'glibc': platform.libc_ver()[1], 'dists': {d.metadata['Name']: d.version "
         "for d in m.distributions() if d.metadata['Name']}}))")


def _probe(client: Any, image: str, platform: str) -> dict:
    """An image's Python ("311"), glibc and Python packages (name: version), asked of it (no network)."""
    out = client.containers.run(image, ["python3", "-c", PROBE], remove=True, network_mode="none", platform=platform,
                                entrypoint=[])
    probed = json.loads(out.decode().strip().splitlines()[-1])
    probed["dists"] = {_dist_key(name): version for name, version in probed["dists"].items()}
    return probed


def cache_dir() -> Path:
    """What builds keep between runs (base image tars, wheels, the example's photograph):
    ``$INFINIBRAIN_CACHE``, else ``~/.cache/infinibrain``."""
    path = Path(os.environ.get("INFINIBRAIN_CACHE") or Path.home() / ".cache" / "infinibrain")
    path.mkdir(parents=True, exist_ok=True)
    return path


TIPS = """to keep it small: prefer PyPI's headless/-cpu wheels (opencv-python-headless, onnxruntime) to
Debian's desktop packages (python3-opencv brings a GUI stack); list apt packages with
--no-install-recommends in mind; keep models in `files` (the top layer) so an update ships only them"""
