# fastclr — the README's commands. Everything a fresh machine needs is installed from here.
#   make install   apt packages (when root) + .venv with pinned torch + fastclr[dali,ffcv,dev,data,peers,plot,tensorboard,tf]
#   make demo      the embedded default run: SimCLR on Fashion-MNIST, ~5 min on 2 CPU cores; its curves
#                  in runs/demo/curves.png
#   make test      the CPU test suite (GPU tests: pytest -m gpu, or benchmarks/gpu_suite.sh)
#   make unit      its unit tests alone (no end-to-end runs), a couple of minutes
#   make bench     images/sec per stage and backend, with peers measured in the same run
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch/torchvision are pinned: these builds are on the local pip cache of our machines; any other
# version downloads several GB.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
APT_PKGS := libturbojpeg0-dev libopencv-dev pkg-config dataset-fashion-mnist shellcheck
# The stamp is keyed on setup.py and this Makefile: a second `make install` does nothing.
STAMP := $(VENV)/.fastclr-installed
PYTEST_ARGS ?=

.PHONY: install demo test unit bench semisup apt gpu-carry clean

install: $(STAMP)

apt:
	@if [ "$$(id -u)" = "0" ] && command -v apt-get >/dev/null; then \
	  missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	    (apt-get install -y -qq $$missing || (apt-get update -qq && apt-get install -y -qq $$missing)); fi; \
	elif command -v dpkg >/dev/null; then \
	  missing=""; for p in $(APT_PKGS); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "fastclr: missing system packages; as root run: apt-get install -y$$missing"; \
	    echo "  (libturbojpeg0-dev libopencv-dev pkg-config build FFCV; dataset-fashion-mnist is the demo data;"; \
	    echo "   shellcheck is used by one test). Continuing: what needs them will fail until they are installed."; fi; \
	else \
	  echo "fastclr: no apt here: install the equivalents of $(APT_PKGS)"; \
	  echo "  (FFCV builds against libturbojpeg and OpenCV headers found with pkg-config)"; \
	fi

$(STAMP): setup.py Makefile
	@$(MAKE) --no-print-directory apt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_PINS)
	# numpy/pkgconfig first: ffcv's setup.py needs them to build its C extension.
	$(BIN)/pip install -q numpy pkgconfig setuptools wheel
	$(BIN)/pip install -q --no-build-isolation -e '.[dali,ffcv,dev,data,peers,plot,tensorboard,tf]' $(TORCH_PINS)
	@touch $@

demo: install
	$(BIN)/torchrun --standalone --nproc_per_node=1 fastclr/pretrain.py
	$(BIN)/python -m fastclr.plot runs/demo

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

unit: install
	$(BIN)/python -m pytest -m "not e2e and not gpu and not slow" $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/throughput.py

semisup: install
	bash experiments/semisup.sh

gpu-carry: install
	bash benchmarks/gpu/carry.sh gpu_carry

clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
