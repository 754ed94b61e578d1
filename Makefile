# The README's two commands: `make demo` (the main job) and `make test` (the suite).
# Both create and reuse .venv at the repository root and install whatever is missing.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV := .venv
BIN := $(VENV)/bin
# This torch/torchvision pair imports together on CPU and GPU (see README, Compatibility).
TORCH := torch==2.14.1 torchvision==0.29.1
PIP_QUIET := grep -v -e '^WARNING: Location' -e '^$$' || true

.PHONY: demo test system-deps

$(VENV)/.installed: pyproject.toml Makefile
	@test -x $(BIN)/python || python3 -m venv $(VENV)
	@echo "Installing nerfstudio-distill into $(VENV) (first time: a few minutes)"
	@$(BIN)/python -m pip install -q --upgrade pip 2>&1 | $(PIP_QUIET)
	@$(BIN)/python -m pip install -q $(TORCH) -e '.[dev]' 2>&1 | $(PIP_QUIET)
	@touch $@

# open3d (imported by ns-export) needs libusb; the viewer test drives Chromium.
system-deps:
	@missing=""; \
	ldconfig -p | grep -q 'libusb-1.0.so.0' || missing="$$missing libusb-1.0-0"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v chromedriver >/dev/null || missing="$$missing chromium-driver"; \
	if [ -n "$$missing" ]; then \
	  if command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
	    echo "Installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "warning: please install the system packages:$$missing (apt-get install$$missing)"; fi; \
	fi

demo: system-deps $(VENV)/.installed
	$(BIN)/python -m nerfstudio_distill.scripts.demo $(ARGS)

test: system-deps $(VENV)/.installed
	$(BIN)/python -m pytest $(ARGS)
