# infinibrain: make demo (set up, run the quick start), make test (set up everything the
# tests need, then run them). For people who want the parts: make engine (a local Docker
# engine), make images (the container images, offline), make boards (emulated SSH boards:
# one sshd per board on 127.0.0.2, 127.0.0.3, ...), make prereqs (what make test sets up).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

BOARDS_DIR ?= /tmp/infinibrain-boards
BOARDS ?= 2

.PHONY: setup demo prereqs test faults soak bench bench-perf bench-group bench-routing bench-models bench-docker bench-ssh engine engine-stop images boards boards-stop clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(PY) pyproject.toml
	$(PY) -m pip install -q -e '.[test]'
	touch $@

setup: $(VENV)/.installed

examples/models/classifier/weights.npz: examples/models/make_weights.py examples/models/classifier/model.py | setup
	$(PY) examples/models/make_weights.py

demo: setup examples/models/classifier/weights.npz
	PY=$(PY) scripts/demo.sh

# Before pytest, never inside a test's timeout: Debian's packages (engine, debootstrap,
# sshd, registry, skopeo, qemu), the engine, and the images (this machine's, arm64, bullseye).
prereqs: setup
	scripts/prereqs.sh $(PY)

test: prereqs
	@$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$status

# The fault suite (also part of make test): faults under load, malformed input, CURVE.
faults: setup
	$(PY) -m pytest -q tests/test_faults.py tests/test_fuzz.py tests/test_security.py

# The soak run: up to 1,000,000 requests from two client processes over four containers,
# one killed every few seconds; bounded by SOAK_SECONDS.
SOAK_SECONDS ?= 300
soak: setup
	$(PY) benchmarks/soak.py --seconds $(SOAK_SECONDS)

bench: setup
	$(PY) benchmarks/bench_infer.py

# The request path against a raw broker, batching, scaling and size: one table. In a
# network namespace with only loopback when unshare may be used.
bench-perf: setup
	if unshare -n true 2>/dev/null; then unshare -n sh -c 'ip link set lo up && exec $(PY) benchmarks/bench_perf.py'; \
	else $(PY) benchmarks/bench_perf.py; fi

# A manager group on etcd (issue 28): takeover after the leader's SIGKILL under load, and
# the request path through a group's leader against a single manager.
bench-group: prereqs
	if unshare -n true 2>/dev/null; then unshare -n sh -c 'ip link set lo up && exec $(PY) benchmarks/bench_group.py'; \
	else $(PY) benchmarks/bench_group.py; fi

# Priorities under load and retries when a replica dies (issue 24), against the same
# system without them.
bench-routing: setup
	if unshare -n true 2>/dev/null; then unshare -n sh -c 'ip link set lo up && exec $(PY) benchmarks/bench_routing.py'; \
	else $(PY) benchmarks/bench_routing.py; fi

# Models served from their files (issue 26), on PP-OCR's networks, against ONNX Runtime
# in one process: per request, replicas and threads, batching, a two-stage pipeline.
bench-models: setup
	$(PY) examples/ocr/ppocr.py >/dev/null  # the models, fetched before the network goes
	if unshare -n true 2>/dev/null; then unshare -n sh -c 'ip link set lo up && exec $(PY) benchmarks/bench_models.py'; \
	else $(PY) benchmarks/bench_models.py; fi

bench-docker: setup images
	$(PY) benchmarks/bench_infer.py --docker
	$(PY) benchmarks/bench_deploy.py

bench-ssh: setup images
	$(PY) benchmarks/bench_deploy.py --ssh
	$(PY) benchmarks/bench_infer.py --ssh

engine:
	scripts/engine.sh start

engine-stop:
	scripts/engine.sh stop

images: setup engine
	$(PY) containers/build.py --save containers/dist

boards: setup
	$(PY) scripts/boards.py start --dir $(BOARDS_DIR) --count $(BOARDS)

boards-stop:
	$(PYTHON) scripts/boards.py stop --dir $(BOARDS_DIR)

clean:
	rm -rf $(VENV) .demo .pytest_cache build *.egg-info examples/models/classifier/weights.npz containers/dist
