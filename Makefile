# Set-up, the default demo, tests and the parity check against the TF reference.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
REF ?= ../shared/reference
WORK ?= out
# Extra verify_all flags: VERIFY_ALL_FLAGS=--optimized (through optimize()) or --onnx (the ONNX export).
VERIFY_ALL_FLAGS ?=

.PHONY: setup setup-effdet demo test test-quick typecheck verify-all mappings check-mappings bench clean

STAMP := $(VENV)/.effdet-installed

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet tensorflow-cpu==2.21.0  # the version the bit-exact tests assume
	$(PY) -m pip install --quiet -e '.[test,export,live]'
	touch $@

setup: $(STAMP)  ## install torch (CPU build), tensorflow-cpu (+ tf_keras for the TF-op tests), onnxruntime and this project into .venv

setup-effdet: setup  ## effdet + timm for the effdet export tests, leaving torch as it is
	$(PY) -m pip install --quiet --no-deps 'effdet>=0.4.1,<0.5' 'timm>=0.9.2' 'omegaconf>=2.0' \
		pyyaml torchvision==0.28.0

demo: setup  ## the main job on the built-in default: d0 checkpoint -> convert -> verify parity
	mkdir -p $(WORK)
	$(PY) $(REF)/synth_ckpt.py --manifest $(REF)/efficientdet-d0/manifest.json --seed 0 \
		--out $(WORK)/efficientdet-d0/model.ckpt
	$(VENV)/bin/convert --ckpt $(WORK)/efficientdet-d0 --out $(WORK)/efficientdet-d0.pth --force
	$(VENV)/bin/verify parity --weights $(WORK)/efficientdet-d0.pth \
		--golden $(REF)/efficientdet-d0 --report $(WORK)/parity-d0.json --plot $(WORK)/parity-d0.png

test: setup  ## the test suite (CPU)
	$(PY) -m pytest -q

test-quick: setup  ## the tests not marked slow (~75 s of CPU; make test runs them all)
	$(PY) -m pytest -q -m "not slow"

typecheck: setup  ## mypy over the model package
	$(PY) -m mypy model

verify-all: setup  ## convert and verify every golden under REF (default ../shared/reference)
	$(PY) -m verify.verify_all --ref $(REF) $(VERIFY_ALL_FLAGS)

mappings: setup  ## regenerate mappings/*.tsv from the rules
	$(PY) -m mappings.generate

check-mappings: setup
	$(PY) -m mappings.generate --check

bench: setup  ## conversion and inference benchmarks (print figures)
	$(PY) benchmarks/bench_convert.py
	$(PY) benchmarks/bench_inference.py

clean:
	rm -rf $(WORK) .pytest_cache
