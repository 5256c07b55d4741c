# Set-up and the main jobs. `make test` and `make demo` install everything they need on a fresh machine.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz
CKPT ?= models/ood28.pt

.PHONY: install data test test-fast demo bench clean

install: $(VENV)/.stamp data

# torch==2.13.0 first: a bare or ranged torch may pull a multi-GB CUDA build (shared/ENVIRONMENT.md)
$(VENV)/.stamp: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -e '.[cpu,test]'
	touch $@

data:
	@if [ ! -f $(FMNIST) ]; then \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	fi

test: install
	$(VENV)/bin/pytest -q -ra

test-fast: install
	$(VENV)/bin/pytest -q -ra -m "not slow and not server"

demo: install
	$(PY) -m biva_demo.demo --ckpt $(CKPT)

bench: install
	$(PY) -m biva_bench.cli --ckpt $(CKPT)

clean:
	rm -rf $(VENV) *.egg-info build
