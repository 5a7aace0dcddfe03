# The two commands a user needs: `make run` and `make test`. Both install what is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PROTO_SRC := $(wildcard protos/keys/v1/*.proto)
PROTO_OUT := keys/v1/keys_pb2.py

.PHONY: install system-deps protos run test lint fmt bench bench-deps manifests image image-name clean

install: $(VENV)/.installed $(PROTO_OUT) system-deps

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

# redis-server, nginx (for the auth_request tests), PostgreSQL's initdb (the ledger
# tests that restart PostgreSQL start their own) and chromium with a font (the console's
# browser tests; Playwright drives it and never downloads a browser of its own) come from
# the machine; install them where they are missing (Debian; its postgresql keeps initdb
# under /usr/lib/postgresql/*/bin).
SYSTEM_PACKAGES := redis-server:redis-server nginx:nginx chromium:chromium
FONT := /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf
system-deps:
	@missing=""; for pair in $(SYSTEM_PACKAGES); do \
	  command -v $${pair%%:*} >/dev/null || [ -x /usr/sbin/$${pair%%:*} ] || missing="$$missing $${pair#*:}"; \
	done; \
	command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	[ -e $(FONT) ] || missing="$$missing fonts-dejavu-core"; \
	if [ -n "$$missing" ]; then \
	  echo "installing$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

protos: $(PROTO_OUT)

# Python stubs for the server, and a descriptor set for Envoy's grpc_json_transcoder.
$(PROTO_OUT): $(PROTO_SRC) $(VENV)/.installed
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/python -m grpc_tools.protoc -I protos \
	  -I $$($(BIN)/python -c 'import google.api, pathlib; print(pathlib.Path(google.api.__path__[0]).parent.parent)') \
	  --python_out=. --grpc_python_out=. --mypy_out=. --mypy_grpc_out=. \
	  --include_imports --descriptor_set_out=keys/v1/keys.pb $(PROTO_SRC)
	touch keys/v1/py.typed

run: install
	$(BIN)/python -m devstack

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# deploy/kubernetes/sidecar/envoy-configmap.yaml is made from envoy.yaml (a test checks it).
manifests: install
	$(BIN)/python -m devstack.sidecar_config

fmt: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: install lint
	$(BIN)/pytest -q $(PYTEST_ARGS)

# h2load (Debian's nghttp2-client) is the load generator `make bench` drives.
bench-deps:
	@command -v h2load >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null; }

bench: install bench-deps
	$(BIN)/python -m bench

# The container image (Dockerfile): IMAGE:TAG, by default extauthz:<the project's version>.
# deploy/kubernetes/ and the docs name exactly this (a test checks it); retarget a registry
# with `make image IMAGE=registry.example.com/extauthz` and kustomize's `images:`.
IMAGE ?= extauthz
TAG ?= $(shell sed -n 's/^version = "\(.*\)"$$/\1/p' pyproject.toml)

image:
	@command -v docker >/dev/null || { echo "make image needs Docker; there is no docker command here" >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { echo "make image needs a running Docker daemon; none answers here" >&2; exit 1; }
	docker build -t $(IMAGE):$(TAG) .

image-name:
	@echo $(IMAGE):$(TAG)

clean:
	rm -rf $(VENV) keys/v1/*_pb2*.py keys/v1/*_pb2*.pyi .mypy_cache .ruff_cache .pytest_cache
