# infinibrain: make demo (set up, run the quick start), make test (run the tests),
# make engine (a local Docker engine), make images (the container images, offline).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup demo test bench bench-docker engine engine-stop images clean

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

test: setup
	@$(PY) -m pytest -q; status=$$?; \
	if [ $$status -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$status

bench: setup
	$(PY) benchmarks/bench_infer.py

bench-docker: setup images
	$(PY) benchmarks/bench_infer.py --docker
	$(PY) benchmarks/bench_deploy.py

engine:
	scripts/engine.sh start

engine-stop:
	scripts/engine.sh stop

images: setup engine
	$(PY) containers/build.py --save containers/dist

clean:
	rm -rf $(VENV) .demo .pytest_cache build *.egg-info examples/models/classifier/weights.npz containers/dist
