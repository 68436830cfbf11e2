#!/usr/bin/env bash
# Everything the tests need that is not Python, on this machine, before pytest starts (make test):
#   Debian's packages: docker.io (the engine), debootstrap (base images), openssh-server
#   (emulated SSH boards), docker-registry and skopeo (the image registry boards pull from),
#   qemu-user-static and binfmt-support (arm64 images under emulation), python3-zmq,
#   python3-msgpack and python3-numpy (the system's Python runs a test's container as
#   another user, who cannot run the venv's interpreter when it lives in root's home),
#   etcd-server and etcd-client (manager groups: the tests run their own members on loopback);
#   binfmt_misc mounted and qemu's arm64 entry enabled;
#   a Docker engine (scripts/engine.sh) and the images (containers/build.py: the runtime for
#   this machine and arm64, the bullseye runtime, the example; the face detector of
#   examples/face_detection, with its photograph);
#   a second Unix user, infinibrain-test, with no home and no login shell (tests run a
#   process container as another user than the manager's).
# Installing never starts a system service: a policy-rc.d refuses while apt runs (the
# emulated boards run their own sshd on 127.0.0.N, the manager its own registry).
#   scripts/prereqs.sh [PYTHON]     (PYTHON: the venv's interpreter, for the image build)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}

PACKAGES=(docker.io debootstrap openssh-server docker-registry skopeo qemu-user-static binfmt-support python3-zmq python3-msgpack python3-numpy chromium etcd-server etcd-client)
have() {
  case "$1" in
    docker.io) command -v dockerd >/dev/null && command -v docker >/dev/null ;;
    openssh-server) [ -x /usr/sbin/sshd ] ;;
    docker-registry) command -v docker-registry >/dev/null ;;
    qemu-user-static) command -v qemu-aarch64-static >/dev/null ;;
    binfmt-support) command -v update-binfmts >/dev/null ;;
    python3-zmq) /usr/bin/python3 -c "import zmq" 2>/dev/null ;;
    python3-msgpack) /usr/bin/python3 -c "import msgpack" 2>/dev/null ;;
    python3-numpy) /usr/bin/python3 -c "import numpy" 2>/dev/null ;;
    etcd-server) command -v etcd >/dev/null ;;
    etcd-client) command -v etcdctl >/dev/null ;;
    *) command -v "$1" >/dev/null ;;
  esac
}

install_missing() {
  local need=()
  for p in "${PACKAGES[@]}"; do have "$p" || need+=("$p"); done
  [ ${#need[@]} -eq 0 ] && return 0
  if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    echo "prereqs: missing ${need[*]} and cannot install them here (needs root and apt-get); tests that need them skip" >&2
    return 0
  fi
  echo "prereqs: installing ${need[*]}"
  local policy=/usr/sbin/policy-rc.d made=0
  if [ ! -e "$policy" ]; then printf '#!/bin/sh\nexit 101\n' >"$policy"; chmod 755 "$policy"; made=1; fi
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -qq "${need[@]}" >/dev/null 2>&1; then  # stale package lists?
    apt-get update -qq >/dev/null && apt-get install -y -qq "${need[@]}" >/dev/null
  fi
  local status=$?
  [ $made = 1 ] && rm -f "$policy"
  return $status
}

enable_arm64() {
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && return 0
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null
  command -v update-binfmts >/dev/null && update-binfmts --enable qemu-aarch64 2>/dev/null
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || echo "prereqs: arm64 programs cannot run here (binfmt_misc); arm64 tests skip" >&2
}

root=0; [ "$(id -u)" = 0 ] && root=1
fatal() { echo "prereqs: $*" >&2; [ $root = 1 ] && exit 1; echo "prereqs: not root: going on; the tests that need it skip" >&2; exit 0; }
install_missing || fatal "apt-get failed"
enable_arm64
if [ $root = 1 ] && ! id infinibrain-test >/dev/null 2>&1; then
  useradd --system --no-create-home --shell /usr/sbin/nologin infinibrain-test || fatal "cannot make the test user"
fi
scripts/engine.sh start || fatal "no Docker engine answers"
arch=()
[ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] && [ "$(uname -m)" != aarch64 ] && arch=(--arch arm64)
"$PY" containers/build.py --bullseye "${arch[@]}" || fatal "the images could not be built"
# ONNX Runtime on the runtime image, for models served from their files (checked at build).
"$PY" -m infinibrain.cli image build containers/runtime-onnx/image.toml --quiet >/dev/null || fatal "the ONNX Runtime image could not be built"
if [ ${#arch[@]} -gt 0 ]; then
  "$PY" -m infinibrain.cli image build containers/runtime-onnx/arm64.toml --quiet >/dev/null || fatal "the arm64 ONNX Runtime image could not be built"
fi
# The real-model example's image (OpenCV from PyPI) and its photograph (from scikit-image's wheel).
"$PY" -m infinibrain.cli image build examples/face_detection/image.toml --quiet >/dev/null || fatal "the face detector's image could not be built"
"$PY" examples/face_detection/photo.py >/dev/null || fatal "the example photograph could not be fetched"
# PP-OCR's detector and recognizer, from the rapidocr-onnxruntime wheel (examples/ocr).
"$PY" examples/ocr/ppocr.py >/dev/null || fatal "PP-OCR's models could not be fetched"
"$PY" -m infinibrain.cli image build examples/ocr/image.toml --quiet >/dev/null || fatal "the OCR example's image could not be built"
