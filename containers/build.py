"""Build infinibrain's container images offline: ``python containers/build.py`` (``make images``).

No image registry is reachable, so nothing is pulled:

1. ``infinibrain/base`` — a Debian root file system made with debootstrap from Debian's
   package archive (python3, numpy, pyzmq, msgpack), made an image (base/Dockerfile). The archive is
   the one this machine's apt sources name (``DEBIAN_MIRROR`` overrides it). The root file
   system is cached as a tar under ``$INFINIBRAIN_CACHE`` (default ``~/.cache/infinibrain``),
   and the imported image is tagged with a hash of its recipe: a rebuild with an unchanged
   recipe reuses the image on the engine, or re-imports the cached tar, and never runs
   debootstrap again.
2. ``infinibrain/runtime`` — ``FROM`` the base, with the ``infinibrain`` package (its
   ``infinibrain.containers`` library and the wire protocol) from this checkout, and a pip
   wheel (``/opt/infinibrain/pip.whl``, run as ``python3 /opt/infinibrain/pip.whl/pip``) so
   images built on it can take PyPI packages without a compiler or pip installed for good.
3. ``infinibrain/example-classifier`` — ``FROM infinibrain/runtime``, the example inference
   of ``examples/models/classifier`` with weights generated at build time.

``--arch arm64`` builds the base and runtime for linux/arm64 as well (Jetson boards):
debootstrap runs the arm64 packages' scripts under qemu-user-static through binfmt_misc
(Debian's ``qemu-user-static`` and ``binfmt-support``), and the images are tagged
``infinibrain/base:bookworm-arm64-<hash>`` and ``infinibrain/runtime:arm64``.
``--bullseye`` also builds ``infinibrain/runtime:bullseye`` on Debian 11 (Python 3.9, the
oldest Python Debian's archive offers here), to run ``infinibrain.containers`` on it.

Images 2 and 3 are built by the engine's own builder from a context assembled here (only
the files the Dockerfile needs), so its layer cache makes a rebuild take seconds.
``--save DIR`` also writes each image as a ``docker save`` tar, the form ``load_inference``
loads from ``image_path``/``image_filename``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import docker

from infinibrain.imagebuild import cache_dir, host_platform_name

log = logging.getLogger("infinibrain.build")

ROOT = Path(__file__).resolve().parent.parent
HERE = ROOT / "containers"

SUITE = "bookworm"
PACKAGES = ["python3", "python3-cffi-backend", "python3-zmq", "python3-msgpack", "python3-numpy"]
HOST_ARCH = host_platform_name().split("/")[1]
# What a container never needs; removing it makes the image about half the size.
TRIM = [
    "var/cache/apt", "var/lib/apt/lists", "usr/share/doc", "usr/share/man",
    "usr/share/info", "usr/share/locale", "var/log",
]
RECIPE_VERSION = 1  # bump when the way the root file system is made changes

BASE = "infinibrain/base"
RUNTIME = "infinibrain/runtime:latest"
EXAMPLE = "infinibrain/example-classifier:latest"
PIP_WHEEL = "/opt/infinibrain/pip.whl"  # in the runtime image


def runtime_tag(arch: str = HOST_ARCH, suite: str = SUITE) -> str:
    """The runtime image of an architecture and Debian release: ``:latest`` (this machine's,
    bookworm), ``:arm64``, ``:bullseye``, ``:bullseye-arm64``."""
    parts = [p for p, plain in ((suite, SUITE), (arch, HOST_ARCH)) if p != plain]
    return f"infinibrain/runtime:{'-'.join(parts)}" if parts else RUNTIME


def recipe_hash(suite: str = SUITE) -> str:
    recipe = {"suite": suite, "packages": sorted(PACKAGES), "trim": TRIM, "version": RECIPE_VERSION}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def base_tag(arch: str = HOST_ARCH, suite: str = SUITE) -> str:
    return f"{suite}-{recipe_hash(suite)}" if arch == HOST_ARCH else f"{suite}-{arch}-{recipe_hash(suite)}"


def debian_mirror() -> str:
    """The Debian archive this machine's apt sources name (``DEBIAN_MIRROR`` overrides it)."""
    if os.environ.get("DEBIAN_MIRROR"):
        return os.environ["DEBIAN_MIRROR"]
    for uri, suites in _apt_sources():
        if not uri.rstrip("/").endswith("-security") and any(s.startswith(SUITE) for s in suites):
            return uri
    raise SystemExit("no Debian archive for bookworm in /etc/apt/sources.list(.d); set DEBIAN_MIRROR")


def _apt_sources() -> list[tuple[str, list[str]]]:
    """(URI, suites) of every enabled "deb" source: one-line lists and deb822 .sources files."""
    found: list[tuple[str, list[str]]] = []
    folder = Path("/etc/apt/sources.list.d")
    for path in [Path("/etc/apt/sources.list"), *sorted(folder.glob("*.list"))]:
        if path.is_file():
            for line in path.read_text().splitlines():
                words = line.split("#")[0].split()
                if len(words) >= 3 and words[0] == "deb":
                    rest = [w for w in words[1:] if not w.startswith("[")]
                    found.append((rest[0], rest[1:2]))
    for path in sorted(folder.glob("*.sources")):
        for stanza in path.read_text().split("\n\n"):
            fields = dict(line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#"))
            fields = {k.strip(): v.strip() for k, v in fields.items()}
            if "deb" in fields.get("Types", "").split() and fields.get("Enabled", "yes") != "no":
                for uri in fields.get("URIs", "").split():
                    found.append((uri, fields.get("Suites", "").split()))
    return found


def has_image(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


# ---- 1. the base image -------------------------------------------------------------------

def make_rootfs(target: Path, arch: str = HOST_ARCH, suite: str = SUITE) -> None:
    """debootstrap a minimal Debian with Python's packages into ``target`` and trim it."""
    if shutil.which("debootstrap") is None:
        raise SystemExit("debootstrap is not installed (apt-get install debootstrap)")
    if arch != HOST_ARCH:
        ensure_emulation(arch)
    mirror = debian_mirror()
    cmd = ["debootstrap", "--variant=minbase", f"--arch={arch}", f"--include={','.join(PACKAGES)}", suite, str(target), mirror]
    log.info("debootstrap %s for %s from %s (%s)", suite, arch, mirror,
             "about a minute" if arch == HOST_ARCH else "several minutes: its packages' scripts run under emulation")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    for rel in TRIM:
        path = target / rel
        if path.is_dir():
            for child in path.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()


def ensure_emulation(arch: str) -> None:
    """Programs of ``arch`` run here through binfmt_misc and qemu-user-static."""
    qemu = {"arm64": "aarch64"}.get(arch, arch)
    entry = Path(f"/proc/sys/fs/binfmt_misc/qemu-{qemu}")
    if not entry.exists():
        binfmt = Path("/proc/sys/fs/binfmt_misc")
        if not (binfmt / "register").exists():
            subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], check=False)
        subprocess.run(["update-binfmts", "--enable", f"qemu-{qemu}"], check=False, stdout=subprocess.DEVNULL)
    if not entry.exists():
        raise SystemExit(f"{arch} programs cannot run here: install qemu-user-static and binfmt-support "
                         "(scripts/prereqs.sh does) and mount binfmt_misc")


def rootfs_tar(arch: str = HOST_ARCH, suite: str = SUITE) -> Path:
    """The cached root file system tar, made if missing."""
    tar = cache_dir() / f"base-{base_tag(arch, suite)}.tar"
    if tar.exists():
        log.info("reusing cached root file system %s", tar)
        return tar
    with tempfile.TemporaryDirectory(dir=cache_dir(), prefix="rootfs.") as tmp:
        root = Path(tmp) / "root"
        make_rootfs(root, arch, suite)
        partial = tar.with_suffix(".partial")
        subprocess.run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], check=True)
        partial.rename(tar)  # a cut-off run leaves no tar that looks complete
    return tar


def build_base(client: docker.DockerClient, arch: str = HOST_ARCH, suite: str = SUITE) -> str:
    tag = f"{BASE}:{base_tag(arch, suite)}"
    if has_image(client, tag):
        log.info("base image %s is up to date", tag)
    else:
        tar = rootfs_tar(arch, suite)
        log.info("making %s from %s", tag, tar.name)
        build(client, tag, {"Dockerfile": HERE / "base" / "Dockerfile", "rootfs.tar": tar}, platform=f"linux/{arch}")
    if arch == HOST_ARCH and suite == SUITE:
        client.images.get(tag).tag(BASE, "latest")
    return tag


# ---- 2. and 3. images built on it --------------------------------------------------------

def context_tar(files: dict[str, Path]) -> io.BytesIO:
    """A build context holding ``files`` (name in the context -> file or folder here)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, path in files.items():
            tar.add(path, arcname=name, filter=_reproducible)
    buf.seek(0)
    return buf


def _reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    # The builder's cache keys on content and metadata: fixed times and owners keep a
    # rebuild of unchanged files a cache hit.
    if "__pycache__" in info.name or info.name.endswith((".pyc", "weights.npz")):
        return None
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def build(client: docker.DockerClient, tag: str, files: dict[str, Path], buildargs: dict | None = None,
          platform: str | None = None, network: str = "none") -> None:
    """Build ``tag`` from a context of ``files``. No network unless asked (``network="host"``
    for a build that installs packages from the archives this machine reaches)."""
    started = time.monotonic()
    stream = client.api.build(
        fileobj=context_tar(files),
        custom_context=True,
        tag=tag,
        rm=True,
        forcerm=True,
        network_mode=network,
        buildargs=buildargs or {},
        platform=platform,
        decode=True,
    )
    for chunk in stream:
        if "error" in chunk:
            raise SystemExit(f"building {tag} failed: {chunk['error'].strip()}")
        text = (chunk.get("stream") or "").strip()
        if text:
            log.debug("%s: %s", tag, text)
    log.info("built %s in %.1f s", tag, time.monotonic() - started)


def pip_wheel() -> Path:
    """The pip wheel this Python carries (ensurepip's): put in the runtime image, it installs
    PyPI packages in images built on it, and nothing of it stays installed."""
    import ensurepip

    bundled = sorted(Path(ensurepip.__file__).parent.glob("_bundled/pip-*.whl"))
    if not bundled:
        raise SystemExit("this Python has no bundled pip wheel (ensurepip); install python3-venv")
    return bundled[-1]


def build_runtime(client: docker.DockerClient, base: str, arch: str = HOST_ARCH, suite: str = SUITE) -> str:
    tag = runtime_tag(arch, suite)
    build(
        client,
        tag,
        {"Dockerfile": HERE / "runtime" / "Dockerfile", "infinibrain": ROOT / "infinibrain", "pip.whl": pip_wheel()},
        {"BASE": base},
        platform=f"linux/{arch}",
    )
    return tag


def build_example(client: docker.DockerClient) -> None:
    models = ROOT / "examples" / "models"
    build(
        client,
        EXAMPLE,
        {
            "Dockerfile": HERE / "examples" / "classifier" / "Dockerfile",
            "classifier": models / "classifier",
            "make_weights.py": models / "make_weights.py",
        },
    )


def save(client: docker.DockerClient, tag: str, folder: Path) -> Path:
    """Write ``tag`` as a ``docker save`` tar into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / (tag.split("/")[-1].replace(":", "_") + ".tar")
    partial = out.with_suffix(".partial")
    with open(partial, "wb") as fh:
        for chunk in client.images.get(tag).save(named=True):
            fh.write(chunk)
    partial.rename(out)
    log.info("saved %s to %s (%.0f MB)", tag, out, out.stat().st_size / 1e6)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", metavar="DIR", type=Path, help="also write each image as a docker save tar into DIR")
    parser.add_argument("--no-example", action="store_true", help="build only the base and runtime images")
    parser.add_argument("--arch", action="append", default=[], metavar="ARCH",
                        help=f"also build base and runtime for ARCH (e.g. arm64; this machine is {HOST_ARCH})")
    parser.add_argument("--bullseye", action="store_true", help="also build infinibrain/runtime:bullseye (Python 3.9)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="build: %(message)s")
    try:
        client = docker.from_env(version="auto", timeout=1800)
        client.ping()
    except docker.errors.DockerException as exc:
        log.error("no Docker engine answers (%s); start one with scripts/engine.sh start", exc)
        return 1
    started = time.monotonic()
    base = build_base(client)
    build_runtime(client, base)
    tags = [RUNTIME]
    if not args.no_example:
        build_example(client)
        tags.append(EXAMPLE)
    others = [(arch, SUITE) for arch in args.arch if arch != HOST_ARCH] + ([(HOST_ARCH, "bullseye")] if args.bullseye else [])
    for arch, suite in others:
        tags.append(build_runtime(client, build_base(client, arch, suite), arch, suite))
    if args.save:
        for tag in tags:
            save(client, tag, args.save)
    log.info("images ready in %.1f s: %s", time.monotonic() - started, ", ".join([base, *tags]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
