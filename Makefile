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

# Debian packages, each installed only when missing (CI: a fresh Debian 12, as root), with one apt-get update:
# Fashion-MNIST; haproxy (the local load balancer, deploy/); prometheus for promtool (the recording rules' unit test,
# deploy/prometheus/rules_test.yml). kubectl is not a Debian package: tests needing it skip without it.
data:
	@pkgs=""; \
	[ -f $(FMNIST) ] || pkgs="$$pkgs dataset-fashion-mnist"; \
	command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || pkgs="$$pkgs haproxy"; \
	command -v promtool >/dev/null || pkgs="$$pkgs prometheus"; \
	if [ -n "$$pkgs" ]; then \
	  echo "installing Debian's$$pkgs"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$pkgs; \
	fi

test: install
	$(VENV)/bin/pytest -q -ra --durations=30

test-fast: install
	$(VENV)/bin/pytest -q -ra -m "not slow and not server"

demo: install
	$(PY) -m biva_demo.demo --ckpt $(CKPT)

bench: install
	$(PY) -m biva_bench.cli --ckpt $(CKPT)

clean:
	rm -rf $(VENV) *.egg-info build
